"""The entry point of one rank: `python -m distill.worker RUN_DIR`.

Reads the resolved config the launcher wrote to RUN_DIR/config.yaml, joins the
process group the environment describes, and trains (resuming from the run
folder's newest checkpoint when there is one).
"""

import logging
import os
import sys
from pathlib import Path

from distill.config.io import load_config
from distill.distributed import init_runtime

CONFIG_FILE = "config.yaml"


def setup_logging(run_dir: Path, rank: int) -> None:
    """Rank 0 logs to the console and launch.log; the others to logs/rank-<r>.log."""
    if rank == 0:
        file = run_dir / "launch.log"
    else:
        (run_dir / "logs").mkdir(exist_ok=True)
        file = run_dir / "logs" / f"rank-{rank}.log"
    handlers = [logging.FileHandler(file)] + ([logging.StreamHandler(sys.stdout)] if rank == 0 else [])
    fmt = f"[%(asctime)s][rank {rank}][%(levelname)s] - %(message)s"
    logging.basicConfig(level=logging.INFO, format=fmt, handlers=handlers, force=True)


def main(argv=None) -> int:
    run_dir = Path((argv or sys.argv[1:])[0])
    config = load_config(run_dir / CONFIG_FILE)
    runtime = init_runtime(config.training.device, config.parallel, config.training.collective_timeout_s)
    setup_logging(run_dir, runtime.rank)
    logging.getLogger("distill").info(
        "rank %d of %d, pid %d, device %s, node %s, code %s",
        runtime.rank, runtime.world_size, os.getpid(), runtime.device,
        os.environ.get("SLURMD_NODENAME", "local"), Path(__file__).resolve().parent,
    )
    if runtime.device.type == "cpu" and config.training.torch_threads is None:
        import torch

        torch.set_num_threads(1)  # several ranks share the cores
    from distill.preemption import Preempted, StopRequest, requeue
    from distill.run import train

    try:
        train(config, run_dir, runtime, StopRequest().install())
    except Preempted as stopped:
        logging.getLogger("distill").warning("%s", stopped)
        if "SLURM_JOB_ID" not in os.environ or config.launcher.name != "slurm":
            return 3  # a local run: launch again into the same folder to resume
        if runtime.is_main:
            requeue(config.launcher.max_requeues)  # raises once the cap is reached
        return -1  # like submitit: no result is written, the requeued job carries on
    finally:
        runtime.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
