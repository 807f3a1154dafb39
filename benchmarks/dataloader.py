"""Training loader throughput against a bare pyarrow read, and against the
rate at which the tiny DMD2 run consumes samples.

Writes a parquet dataset of the tiny Wan model's shapes (latent [16, 3, 16, 16],
text [8, 32]) to a temp folder, then measures samples/s of:
  - a bare sequential pyarrow read of the shards, decoding every tensor
  - the training loader (shuffled, padded, normalised batches), 0 and 2 workers
  - a DMD2 training step on the tiny model, fed by the loader
Medians of --repeats passes; ratios printed last.

    python benchmarks/dataloader.py [--rows 2048] [--batch 8] [--repeats 3]
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distill.data.parquet import ParquetIndex, ParquetLatents, Shapes, StatefulLoader  # noqa: E402
from distill.data.schema import make_row  # noqa: E402
from distill.data.writer import write_dataset  # noqa: E402

SHAPES = Shapes((16, 3, 16, 16), 8, 32)


def build(folder: Path, rows: int) -> None:
    g = torch.Generator().manual_seed(0)
    write_dataset(
        [make_row(f"r{i}", torch.randn(6, 32, generator=g), "c", torch.randn(16, 3, 16, 16, generator=g)) for i in range(rows)],
        folder,
        rows_per_shard=512,
        row_group_size=16,
    )


def bare_read(folder: Path) -> int:
    n = 0
    for shard in sorted(folder.glob("*.parquet")):
        table = pq.read_table(shard).to_pydict()
        for raw, shape, t_raw, t_shape in zip(
            table["vae_latent_bytes"], table["vae_latent_shape"], table["text_embedding_bytes"], table["text_embedding_shape"]
        ):
            torch.from_numpy(np.frombuffer(raw, dtype=np.float32).copy()).reshape(shape)
            torch.from_numpy(np.frombuffer(t_raw, dtype=np.float32).copy()).reshape(t_shape)
            n += 1
    return n


def loader_read(folder: Path, batch: int, workers: int, batches: int) -> int:
    ds = ParquetLatents(ParquetIndex(str(folder), SHAPES), SHAPES, batch, seed=0)
    loader = StatefulLoader(ds, num_workers=workers)
    for _ in range(batches):
        next(loader)
    return batches * batch


def dmd2_rate(folder: Path, batch: int, steps: int) -> float:
    from hydra import compose, initialize_config_dir

    from distill.config import register_configs, validate
    from distill.run import build_trainer

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose(
            config_name="config",
            overrides=["experiment=tiny", "logger=none", "validation.num_samples=1", "data=parquet", f"data.path={folder}", f"data.batch_size={batch}", "data.num_workers=0",
                       "method.rollout=data", "training.max_steps=100000"],
        )
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = build_trainer(validate(cfg), run_dir)
        trainer.advance()
        t0 = time.perf_counter()
        for _ in range(steps):
            trainer.advance()
        elapsed = time.perf_counter() - t0
        trainer.tracker.close()
    return steps * batch / elapsed


def timed(fn, *args) -> float:
    t0 = time.perf_counter()
    n = fn(*args)
    return n / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "data"
        build(folder, args.rows)
        batches = args.rows // args.batch
        bare, w0, w2 = [], [], []
        for _ in range(args.repeats):
            bare.append(timed(bare_read, folder))
            w0.append(timed(loader_read, folder, args.batch, 0, batches))
            w2.append(timed(loader_read, folder, args.batch, 2, batches))
        step = dmd2_rate(folder, args.batch, steps=30)
    bare, w0, w2 = statistics.median(bare), statistics.median(w0), statistics.median(w2)
    print(f"{args.rows} rows, latent [16,3,16,16] fp32, batch {args.batch}, medians of {args.repeats}")
    print(f"bare pyarrow sequential read   {bare:10.0f} samples/s")
    print(f"training loader, 0 workers     {w0:10.0f} samples/s   ratio to bare {w0 / bare:.2f}")
    print(f"training loader, 2 workers     {w2:10.0f} samples/s   ratio to bare {w2 / bare:.2f}")
    print(f"tiny DMD2 step consumes        {step:10.0f} samples/s   loader (0 workers) / consumption {w0 / step:.1f}x")


if __name__ == "__main__":
    main()
