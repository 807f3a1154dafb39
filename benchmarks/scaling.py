"""Per-rank memory under FSDP2 and checkpoint save throughput.

For 1, 2 and 4 local processes (gloo, CPU) builds the DMD2 roles of a small
Wan transformer (about 4.6M parameters each) through the project's own
builders, takes one training step so the optimizers hold their moments, and
reports per rank:
  - parameter + optimizer bytes of the trainable roles (goal: ~1/N of 1 process)
  - the time to write a full checkpoint (DCP, safetensors shards) against
    writing the same local tensors with safetensors.save_file directly;
  - where a save's time goes: the parts' state dicts, DCP with the Hugging
    Face safetensors writer the checkpoints use, DCP with its own format, and
    the SHA-256 of the files (each timed alone).

    python benchmarks/scaling.py [--procs 1 2 4] [--repeats 5]
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ARCH = [
    "model.arch.num_attention_heads=4",
    "model.arch.attention_head_dim=64",
    "model.arch.ffn_dim=1024",
    "model.arch.num_layers=4",
    "model.arch.text_dim=256",
    "model.arch.freq_dim=64",
    "model.text_dim=256",
    "model.latent_shape=[16,2,16,16]",
]


def local_bytes(tensors) -> int:
    from torch.distributed.tensor import DTensor

    total = 0
    for t in tensors:
        t = t.to_local() if isinstance(t, DTensor) else t
        total += t.numel() * t.element_size()
    return total


def worker(out_file: str, repeats: int) -> None:
    import torch
    from hydra import compose, initialize_config_dir
    from safetensors.torch import save_file
    from torch.distributed.tensor import DTensor

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter, HuggingFaceStorageWriter

    from distill.checkpoint import checksums, flatten
    from distill.config import register_configs, validate
    from distill.distributed import init_runtime
    from distill.run import build_trainer

    torch.set_num_threads(1)
    runtime = init_runtime("cpu")
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=["experiment=tiny", "logger=none", *ARCH, "data.batch_size=1", "training.max_steps=100"])
    tmp = Path(out_file).parent  # shared by the ranks, like a run folder
    run_dir = tmp / "run"
    run_dir.mkdir(exist_ok=True)
    trainer = build_trainer(validate(cfg), run_dir, runtime)
    trainer.advance()  # optimizer moments exist after a step
    trainable = [r for r in trainer.roles.values() if r.trainable]
    params = local_bytes(p for r in trainable for p in r.module.parameters())
    optim = local_bytes(
        v for r in trainable for s in r.optimizer.state.values() for v in s.values() if torch.is_tensor(v)
    )
    dcp_times, st_times = [], []
    parts = {k: [] for k in ("state dicts", "DCP, HF safetensors writer", "DCP, DCP's own format", "SHA-256 of files")}
    for i in range(repeats):
        runtime.barrier()
        t0 = time.perf_counter()
        trainer.checkpointer.save(1000 + i)
        dcp_times.append(time.perf_counter() - t0)
        # where the save's time goes, each piece alone (same shared tensors)
        t0 = time.perf_counter()
        shared = {k: v for name, (part, per_rank) in trainer.checkpointer.parts.items() if not per_rank
                  for k, v in flatten(part.state_dict(), f"{name}/").items() if torch.is_tensor(v)}
        parts["state dicts"].append(time.perf_counter() - t0)
        for key, writer in (("DCP, HF safetensors writer", HuggingFaceStorageWriter(str(tmp / f"hf-{i}"), save_distributed=True)),
                            ("DCP, DCP's own format", FileSystemWriter(str(tmp / f"fs-{i}"), thread_count=1))):
            runtime.barrier()
            t0 = time.perf_counter()
            dcp.save(shared, storage_writer=writer)
            runtime.barrier()
            parts[key].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        checksums(trainer.checkpointer.path(1000 + i))
        parts["SHA-256 of files"].append(time.perf_counter() - t0)
        state = {
            k: (v.to_local() if isinstance(v, DTensor) else v).detach().contiguous()
            for name, role in trainer.roles.items() if role.trainable
            for k, v in flatten(role.state_dict(), f"{name}/").items() if torch.is_tensor(v)
        }
        runtime.barrier()
        t0 = time.perf_counter()
        save_file(state, str(Path(tmp) / f"plain-{runtime.rank}-{i}.safetensors"))
        runtime.barrier()
        st_times.append(time.perf_counter() - t0)
    checkpoint_bytes = local_bytes(state.values())
    result = dict(
        rank=runtime.rank,
        world=runtime.world_size,
        params=params,
        optim=optim,
        checkpoint_bytes=checkpoint_bytes,
        dcp_s=statistics.median(dcp_times),
        safetensors_s=statistics.median(st_times),
        parts={k: statistics.median(v) for k, v in parts.items()},
    )
    with open(f"{out_file}.{runtime.rank}", "w") as f:
        json.dump(result, f)
    runtime.shutdown()


def run(nproc: int, repeats: int) -> list:
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from distill.launcher import free_port

    out = str(Path(tempfile.mkdtemp()) / "result")
    os.environ["OMP_NUM_THREADS"] = "1"
    if nproc == 1:
        import subprocess

        subprocess.run([sys.executable, __file__, "--worker", out, "--repeats", str(repeats)], check=True)
    else:
        config = LaunchConfig(
            min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id="bench", rdzv_backend="c10d",
            rdzv_endpoint=f"127.0.0.1:{free_port()}", max_restarts=0,
        )
        elastic_launch(config, sys.executable)(__file__, "--worker", out, "--repeats", str(repeats))
    results = []
    for rank in range(nproc):
        with open(f"{out}.{rank}") as f:
            results.append(json.load(f))
    shutil.rmtree(Path(out).parent)
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.repeats)
        return
    rows = {n: run(n, args.repeats) for n in args.procs}
    base = max(r["params"] + r["optim"] for r in rows[args.procs[0]])
    mib = 2**20
    print("DMD2 roles of a 4.6M-parameter Wan transformer, CPU/gloo, medians of", args.repeats, "saves")
    print(f"{'procs':>5} {'param+optim MiB/rank (max)':>27} {'ratio to 1 proc':>16} {'ideal':>6} "
          f"{'DCP save MiB/s':>15} {'safetensors MiB/s':>18} {'DCP/safetensors':>16}")
    for n, results in rows.items():
        per_rank = max(r["params"] + r["optim"] for r in results)
        total_bytes = sum(r["checkpoint_bytes"] for r in results)
        dcp_s = max(r["dcp_s"] for r in results)
        st_s = max(r["safetensors_s"] for r in results)
        print(f"{n:>5} {per_rank / mib:>27.2f} {per_rank / base:>16.3f} {1 / n:>6.3f} "
              f"{total_bytes / mib / dcp_s:>15.1f} {total_bytes / mib / st_s:>18.1f} {st_s / dcp_s:>16.2f}")
    print("\nWhere a save's time goes (slowest rank, seconds; each piece timed alone):")
    keys = list(rows[args.procs[0]][0]["parts"])
    print(f"{'procs':>5} {'whole save':>11} " + " ".join(f"{k:>27}" for k in keys) + f" {'plain safetensors':>18}")
    for n, results in rows.items():
        print(f"{n:>5} {max(r['dcp_s'] for r in results):>11.3f} "
              + " ".join(f"{max(r['parts'][k] for r in results):>27.3f}" for k in keys)
              + f" {max(r['safetensors_s'] for r in results):>18.3f}")


if __name__ == "__main__":
    main()
