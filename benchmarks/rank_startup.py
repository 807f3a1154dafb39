"""How long a local multi-rank launch takes with its ranks forked from a fork server
that imported torch and diffusers once, against ranks that each import them (spawn).

    python benchmarks/rank_startup.py [--ranks 2] [--repeats 5] [--busy 1]

Each repeat runs both start methods one after the other (alternating which goes
first), each in a fresh process that composes `experiment=tiny` for 2 steps (no
validation, checkpoint or export) and times `run_local_processes`: the ranks' start,
imports, rendezvous, model building and the 2 steps. `--busy N` keeps N processes
spinning on the CPU meanwhile, as a second test worker, a data loader or another
job does on a shared machine; on idle cores the ranks import side by side.
Prints the median wall time of each method and their ratio.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RUN = ["experiment=tiny", "logger=none", "training.max_steps=2", "validation.every=0", "checkpoint.every=0",
       "training.export_at_end=false"]
METHODS = ("spawn", "forkserver")


def one_launch(method: str, run_dir: Path, ranks: int) -> None:
    """In this process: write the run's config, then time the ranks' launch."""
    from hydra import compose, initialize_config_dir

    from distill.config import register_configs, validate
    from distill.config.io import save_config
    from distill.launcher import run_local_processes
    from distill.worker import CONFIG_FILE

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        config = validate(compose(config_name="config", overrides=[*RUN, f"launcher.nproc_per_node={ranks}"]))
    run_dir.mkdir(parents=True)
    save_config(config, run_dir / CONFIG_FILE)
    start = time.perf_counter()
    run_local_processes(run_dir, ranks, start_method=method)
    print(f"SECONDS {time.perf_counter() - start:.3f}")


def timed(method: str, run_dir: Path, ranks: int) -> float:
    done = subprocess.run([sys.executable, __file__, "--one", method, str(run_dir), "--ranks", str(ranks)],
                          capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    lines = [line for line in done.stdout.splitlines() if line.startswith("SECONDS ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{method} launch failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return float(lines[-1].split()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--busy", type=int, default=1, help="CPU-spinning processes beside the launch")
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "RUN_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        one_launch(args.one[0], Path(args.one[1]), args.ranks)
        return
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    times = {m: [] for m in METHODS}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for repeat in range(args.repeats):
                for method in (METHODS if repeat % 2 == 0 else METHODS[::-1]):
                    times[method].append(timed(method, Path(tmp) / f"{method}-{repeat}", args.ranks))
    finally:
        for spinner in spinners:
            spinner.kill()
    print(f"{args.ranks} ranks, {args.busy} busy process(es) beside them, {args.repeats} repeats")
    for method in METHODS:
        print(f"{method:>11}: median {statistics.median(times[method]):6.2f} s  "
              f"({', '.join(f'{t:.2f}' for t in times[method])})")
    ratio = statistics.median(times["spawn"]) / statistics.median(times["forkserver"])
    print(f"spawn / forkserver: {ratio:.2f}x")


if __name__ == "__main__":
    main()
