"""Context parallelism: measured memory and step time per rank on the CPU, and
the memory plan for Wan2.1 1.3B / 14B at real sizes.

    python benchmarks/context_parallel.py                 # both parts
    python benchmarks/context_parallel.py --part plan     # the planner table only

Part 1 runs DMD2 on a tiny Wan with a long sequence (4 heads x 32, 2,048 tokens)
at parallel.context = 1, 2, 4 (that many local processes, gloo): per rank the
bytes of tensors held above the weights and optimizer state (activations and
gradients, counted by distill.plan.LiveTensorBytes) over a generator and a
critic iteration, the plan's figure for the same, and the median step time.
On a 2-core machine 4 processes share 2 cores: the times show the overhead of
the exchange, not a speed-up.

Part 2 prints the planner's peak per 80 GB GPU for one node of 8 GPUs.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

LONG = ["experiment=tiny", "logger=none", "model.arch.num_attention_heads=4", "model.arch.attention_head_dim=32",
        "model.arch.ffn_dim=256", "model.latent_shape=[16,8,32,32]", "data.batch_size=1",
        "method.generator_update_interval=2", "validation.every=0", "checkpoint.every=0"]
TIMED = 6


def worker(context: int, out: Path) -> None:
    import torch

    from conftest import compose_config
    from distill.config import validate
    from distill.distributed import init_runtime
    from distill.models import build_adapter
    from distill.plan import LiveTensorBytes, layout_of, make_plan
    from distill.run import build_trainer

    torch.set_num_threads(1)
    config = validate(compose_config([*LONG, f"launcher.nproc_per_node={context}", f"parallel.context={context}"]))
    runtime = init_runtime("cpu", config.parallel)
    with tempfile.TemporaryDirectory() as folder:
        trainer = build_trainer(config, folder, runtime)
        trainer.train_step(0)  # optimizer state exists from here on
        trainer.train_step(1)
        held = [role.module for role in trainer.roles.values()]
        with LiveTensorBytes(held) as live:
            for role in trainer.roles.values():
                if role.optimizer is not None:
                    for state in role.optimizer.state.values():
                        for t in state.values():
                            live.add(t)
            start = live.current
            trainer.train_step(2)
            trainer.train_step(3)
        times = []
        for i in range(4, 4 + TIMED):
            t0 = time.perf_counter()
            trainer.train_step(i)
            times.append(time.perf_counter() - t0)
    plan = make_plan(config, build_adapter(config.model), layout_of(config), 80)
    resident = sum(r.resident for r in plan.roles.values())
    if runtime.is_main:
        out.write_text(json.dumps({"measured": live.peak - start, "planned": plan.peak - resident,
                                   "step_s": statistics.median(times)}))
    runtime.shutdown()


def measure(context: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "result.json"
        env = dict(os.environ, OMP_NUM_THREADS="1")
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={context}", "--master_port=29531",
               __file__, "--worker", str(context), str(out)]
        if context == 1:
            cmd = [sys.executable, __file__, "--worker", "1", str(out)]
        subprocess.run(cmd, env=env, check=True, capture_output=True, cwd=ROOT)
        return json.loads(out.read_text())


def cpu_part() -> None:
    print("part 1: tiny Wan, 2,048 tokens, DMD2, per rank (CPU, gloo)")
    print(f"{'context':>8}{'tokens/rank':>13}{'measured MiB':>14}{'planned MiB':>13}{'plan/meas':>11}"
          f"{'step s':>9}{'vs cp1':>8}")
    base = None
    for context in (1, 2, 4):
        r = measure(context)
        base = base or r
        print(f"{context:>8}{2048 // context:>13}{r['measured'] / 2**20:>14.1f}{r['planned'] / 2**20:>13.1f}"
              f"{r['planned'] / r['measured']:>11.2f}{r['step_s']:>9.3f}{r['measured'] / base['measured']:>8.2f}")


def plan_part() -> None:
    from hydra import compose, initialize_config_dir

    from distill.config import register_configs, validate
    from distill.models import build_adapter
    from distill.plan import GiB, Layout, make_plan

    register_configs()
    sizes = {"81x480x832": [16, 21, 60, 104], "81x720x1280": [16, 21, 90, 160]}
    models = {"1.3B (student, critic, teacher)": "wan21_t2v_1.3b_dmd2_4step",
              "14B (student, critic, teacher)": "wan21_t2v_14b_dmd2_4step_cp4"}
    print("\npart 2: memory plan, peak GiB per 80 GB GPU, 1 node x 8 GPUs, batch 1, full checkpointing")
    print(f"{'model':<34}{'size':<13}" + "".join(f"{'cp=' + str(c):>9}" for c in (1, 2, 4, 8)))
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        for label, experiment in models.items():
            for size, shape in sizes.items():
                cells = []
                for context in (1, 2, 4, 8):
                    cfg = compose(config_name="config", overrides=[
                        f"experiment={experiment}", "plan=true", f"model.latent_shape={shape}",
                        "launcher=local", "launcher.nproc_per_node=8", f"parallel.context={context}",
                        "training.global_batch_size=null"])
                    try:
                        config = validate(cfg)
                    except Exception as err:  # a context the heads do not split into
                        cells.append("n/a" if "num_attention_heads" in str(err) else "error")
                        continue
                    plan = make_plan(config, build_adapter(config.model), Layout(8, 1, context), 80)
                    cells.append(f"{plan.peak / GiB:.1f}" + ("" if plan.fits else "!"))
                print(f"{label:<34}{size:<13}" + "".join(f"{c:>9}" for c in cells))
    print("! : over the 72 GiB usable of an 80 GB GPU; n/a: the 1.3B model's 12 heads do not split 8 ways")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["cpu", "plan", "all"], default="all")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(int(args.worker[0]), Path(args.worker[1]))
        return
    if args.part in ("cpu", "all"):
        cpu_part()
    if args.part in ("plan", "all"):
        plan_part()


if __name__ == "__main__":
    main()
