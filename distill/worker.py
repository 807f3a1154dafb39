"""The entry point of one rank: `run_rank(RUN_DIR)`, in a process the local launcher
forks (distill/launcher.py) or a SLURM task (distill/slurm.py).

Reads the resolved config the launcher wrote to RUN_DIR/config.yaml, joins the
process group the environment describes, and trains (resuming from the run
folder's newest checkpoint when there is one).
"""

import faulthandler
import logging
import os
import sys
from pathlib import Path

from distill.config.io import load_config
from distill.distributed import init_runtime

CONFIG_FILE = "config.yaml"


def setup_logging(run_dir: Path, rank: int) -> None:
    """Rank 0 logs to the console and launch.log; the others to logs/rank-<r>.log.
    A rank killed by a fatal signal (a native crash: SIGSEGV, SIGABRT from glibc's heap
    checks, SIGBUS) writes the Python stack of every thread into its log first, so that
    a crash seen once says where it happened."""
    if rank == 0:
        file = run_dir / "launch.log"
    else:
        (run_dir / "logs").mkdir(exist_ok=True)
        file = run_dir / "logs" / f"rank-{rank}.log"
    handlers = [logging.FileHandler(file)] + ([logging.StreamHandler(sys.stdout)] if rank == 0 else [])
    fmt = f"[%(asctime)s][rank {rank}][%(levelname)s] - %(message)s"
    logging.basicConfig(level=logging.INFO, format=fmt, handlers=handlers, force=True)
    global _fault_log
    _fault_log = open(file, "a")  # kept open for the process's life: faulthandler writes to its descriptor
    faulthandler.enable(file=_fault_log, all_threads=True)


_fault_log = None


def main(run_dir: str) -> int:
    run_dir = Path(run_dir)
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
    from distill.checkpoint import CheckpointError
    from distill.data import DataError
    from distill.launcher import EXIT_CHECKPOINT, EXIT_COLLAPSE, EXIT_DATA, EXIT_NONFINITE, EXIT_SIGNAL_BASE
    from distill.preemption import Preempted, StopRequest, requeue
    from distill.run import RunFinished, train
    from distill.run_health import Collapse, NonFiniteLoss

    log = logging.getLogger("distill")
    under_slurm = "SLURM_JOB_ID" in os.environ and config.launcher.name == "slurm"
    try:
        train(config, run_dir, runtime, StopRequest().install())
    except RunFinished as done:
        log.info("%s", done)
    except Preempted as stopped:
        log.warning("%s", stopped)
        if not under_slurm:
            return EXIT_SIGNAL_BASE + stopped.signum  # launch again into the same folder to resume
        if runtime.is_main:
            requeue(config.launcher.max_requeues)  # raises once the cap is reached
        return -1  # like submitit: no result is written, the requeued job carries on
    except (DataError, CheckpointError) as err:
        if under_slurm:
            raise  # submitit records it as the job's failure
        log.error("%s error: %s", "data" if isinstance(err, DataError) else "checkpoint", err)
        return EXIT_DATA if isinstance(err, DataError) else EXIT_CHECKPOINT
    except (NonFiniteLoss, Collapse) as err:
        if under_slurm:
            raise
        log.error("%s", err)
        return EXIT_NONFINITE if isinstance(err, NonFiniteLoss) else EXIT_COLLAPSE
    finally:
        runtime.shutdown()
    return 0


def run_rank(run_dir: str) -> None:
    """Trains this rank and exits with main's code; 0 returns, which the elastic launcher
    and submitit read as success (a requeued SLURM job exits without a result)."""
    code = main(run_dir)
    if code:
        sys.exit(code)
