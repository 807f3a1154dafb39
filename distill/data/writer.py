"""Writing parquet shards: never a half-written shard under its final name."""

import os
from pathlib import Path
from typing import Dict, List, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from distill.data.schema import FIRST_FRAME, schema

SHARD = "shard-{:05d}.parquet"


def write_shard(rows: Sequence[Dict[str, object]], path: Path, row_group_size: int = 8) -> Path:
    """Write rows to `path` through a temporary file and an atomic rename."""
    with_latents, with_ode = "vae_latent_bytes" in rows[0], "ode_trajectory_bytes" in rows[0]
    i2v = f"{FIRST_FRAME}_bytes" in rows[0]
    table = pa.Table.from_pylist(list(rows), schema=schema(with_latents, with_ode, i2v))
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


class RankShards:
    """One rank's rows into `shard-r<rank>-<n>.parquet` of a folder, `rows_per_shard` at a
    time, numbered on after the shards a previous run of this rank left (resumable jobs)."""

    def __init__(self, folder: Path, rank: int, rows_per_shard: int = 256, row_group_size: int = 8):
        self.folder, self.rank = Path(folder), rank
        self.rows_per_shard, self.row_group_size = rows_per_shard, row_group_size
        self.index = len(list(self.folder.glob(f"shard-r{rank:03d}-*.parquet")))
        self.pending: List[Dict[str, object]] = []

    def add(self, row: Dict[str, object]) -> None:
        self.pending.append(row)
        while len(self.pending) >= self.rows_per_shard:
            self._write(self.pending[: self.rows_per_shard])
            self.pending = self.pending[self.rows_per_shard :]

    def close(self) -> None:
        if self.pending:
            self._write(self.pending)
            self.pending = []

    def _write(self, rows) -> None:
        write_shard(rows, self.folder / f"shard-r{self.rank:03d}-{self.index:05d}.parquet", self.row_group_size)
        self.index += 1
