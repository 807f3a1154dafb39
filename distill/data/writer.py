"""Writing parquet shards: never a half-written shard under its final name."""

import os
from pathlib import Path
from typing import Dict, List, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from distill.data.schema import schema

SHARD = "shard-{:05d}.parquet"


def write_shard(rows: Sequence[Dict[str, object]], path: Path, row_group_size: int = 8) -> Path:
    """Write rows to `path` through a temporary file and an atomic rename."""
    with_latents, with_ode = "vae_latent_bytes" in rows[0], "ode_trajectory_bytes" in rows[0]
    table = pa.Table.from_pylist(list(rows), schema=schema(with_latents, with_ode))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp, row_group_size=row_group_size)
    os.replace(tmp, path)
    return path


def write_dataset(rows: List[Dict[str, object]], folder: Path, rows_per_shard: int = 256, row_group_size: int = 8):
    """Rows into consecutive shards shard-00000.parquet, ... of a folder."""
    paths = []
    for i, start in enumerate(range(0, len(rows), rows_per_shard)):
        paths.append(write_shard(rows[start : start + rows_per_shard], Path(folder) / SHARD.format(i), row_group_size))
    return paths
