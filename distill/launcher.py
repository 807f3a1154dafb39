"""Where a validated config runs.

local, nproc_per_node=1: in this process. local, nproc_per_node=N: N processes
on this machine through torch's elastic launcher (torchrun's engine), forked from
a fork server that imported what every rank needs (RANK_IMPORTS); when one rank
fails the launcher stops the others and reports the rank, its exit code and its
log. slurm: a job through submitit (distill/slurm.py); in a Hydra
multirun the points are collected and submitted as one job array once all of
them have composed and validated.
"""

import os
import signal
import socket
import uuid
from pathlib import Path
from typing import Callable, Optional, Tuple

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from distill.config.io import save_config
from distill.config.schema import Config
from distill.worker import CONFIG_FILE, run_rank


EXIT_FAILED, EXIT_CONFIG, EXIT_DATA, EXIT_CHECKPOINT, EXIT_NONFINITE, EXIT_COLLAPSE = 1, 2, 3, 4, 5, 6
EXIT_SIGNAL_BASE = 128  # stopped by signal N: 128 + N, as shells report it


class LaunchError(RuntimeError):
    def __init__(self, message: str, exit_code: int = EXIT_FAILED):
        super().__init__(message)
        self.exit_code = exit_code


def resume_command(run_dir: Path) -> str:
    return f"python launch.py hydra.run.dir={run_dir}"


def outcome(action: Callable[[], None], run_dir: Optional[Path]) -> Tuple[int, str]:
    """Run `action`; (exit code, one-line message) for how it ended: done, finished
    before, stopped by a signal, bad data, bad checkpoint or failed."""
    from distill.checkpoint import CheckpointError
    from distill.data import DataError
    from distill.preemption import Preempted
    from distill.run import RunFinished
    from distill.run_health import Collapse, NonFiniteLoss

    try:
        action()
    except RunFinished as done:
        return 0, str(done)
    except Preempted as stopped:
        return EXIT_SIGNAL_BASE + stopped.signum, f"{stopped}\nresume with: {resume_command(run_dir)}"
    except DataError as err:
        return EXIT_DATA, f"data error: {err}"
    except CheckpointError as err:
        return EXIT_CHECKPOINT, f"checkpoint error: {err}"
    except NonFiniteLoss as err:
        return EXIT_NONFINITE, f"non-finite loss: {err}"
    except Collapse as err:
        return EXIT_COLLAPSE, f"collapse: {err}\nresume with: {resume_command(run_dir)}"
    except LaunchError as err:
        return err.exit_code, str(err)
    return 0, ""


# slurm sweep points waiting for the end of the multirun: (launcher config, run folder)
PENDING_ARRAY: list = []


def launch(config: Config) -> None:
    hydra = HydraConfig.get()
    run_dir = Path(hydra.runtime.output_dir)
    if config.launcher.name == "slurm" and not config.launcher.dry_run:
        from distill.slurm import missing_slurm

        if missing_slurm():
            raise LaunchError(missing_slurm())
    save_config(config, run_dir / CONFIG_FILE)
    if config.launcher.name == "slurm" and config.launcher.dry_run:
        from distill.distributed import describe_layout

        launcher = config.launcher
        print(describe_layout(config.parallel, launcher.nodes, launcher.tasks_per_node or max(launcher.gpus_per_node, 1)))
    if config.launcher.name == "slurm":
        if hydra.mode == RunMode.MULTIRUN:
            PENDING_ARRAY.append((config.launcher, run_dir, config.validation.evaluate))
        else:
            submit_slurm(config.launcher, [run_dir], run_dir, [config.validation.evaluate])
    elif config.launcher.nproc_per_node == 1:
        from distill.preemption import StopRequest
        from distill.run import train

        train(config, run_dir, stop=StopRequest().install())
    else:
        run_local_processes(run_dir, config.launcher.nproc_per_node)


def submit_pending_array() -> None:
    """After a multirun with launcher=slurm: submit all its points as one array."""
    if not PENDING_ARRAY:
        return
    cfg = PENDING_ARRAY[0][0]
    run_dirs = [run_dir for _, run_dir, _ in PENDING_ARRAY]
    evaluations = [evaluate for _, _, evaluate in PENDING_ARRAY]
    PENDING_ARRAY.clear()
    submit_slurm(cfg, run_dirs, Path(os.path.commonpath([str(d) for d in run_dirs])), evaluations)


def submit_slurm(cfg, run_dirs, folder: Path, evaluations) -> None:
    """The training job(s), and a watcher job beside each run whose validation.evaluate.watcher is on."""
    from distill.evaluation.submit import submit_watcher
    from distill.slurm import report, submit

    jobs = submit(cfg, run_dirs, folder)
    code = folder / "code" if cfg.snapshot_code else None
    for i, (run_dir, evaluate) in enumerate(zip(run_dirs, evaluations)):
        if evaluate.watcher:
            job = submit_watcher(cfg, run_dir, evaluate, code, jobs[i].job_id if jobs else None)
            if job:
                print(f"job {job}: the evaluation watcher of {run_dir}")
    if jobs and report(jobs, run_dirs, cfg.wait) != 0:
        raise LaunchError("run failed: a SLURM job failed (see above)")


# What every rank imports before it builds a network: about 7 s of one core a process
# (diffusers' transformers package imports all of its models, peft and transformers).
# The fork server imports them once and each rank is forked from it, so N ranks do not
# import them N times over on shared cores (benchmarks/rank_startup.py). The launching
# process itself still never imports diffusers.
RANK_IMPORTS = ["torch", "torch.distributed.fsdp", "diffusers.models.transformers"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_local_processes(run_dir: Path, nproc: int, start_method: str = "forkserver") -> None:
    """N ranks of the run in run_dir under torch's elastic launcher, forked from a fork
    server that holds RANK_IMPORTS (`spawn`: each rank a fresh interpreter that imports
    everything itself)."""
    import multiprocessing

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    os.environ.setdefault("OMP_NUM_THREADS", "1")  # ranks share the cores
    # A CUDA query in the fork server would poison the fork (the ranks could not use their GPUs):
    # the imports make none (tests/test_launch.py), and torch's NVML-based check keeps any
    # is_available() from initialising the driver there.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    multiprocessing.set_forkserver_preload(RANK_IMPORTS)
    launch_config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=uuid.uuid4().hex[:8],
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{free_port()}",
        max_restarts=0,
        monitor_interval=0.5,
        start_method=start_method,
    )
    try:
        elastic_launch(launch_config, run_rank)(str(run_dir))
    except ChildFailedError as err:
        raise rank_failures(err.failures, run_dir) from None


def rank_failures(failures: dict, run_dir: Path) -> LaunchError:
    """One error for the failed ranks: a stop when every rank stopped on a signal,
    otherwise the first rank's own exit code (3 data, 4 checkpoint, 5 a non-finite loss,
    6 a collapse, 1 anything else)."""
    codes = {rank: failure.exitcode for rank, failure in sorted(failures.items())}
    if all(code > EXIT_SIGNAL_BASE for code in codes.values()):
        code = max(codes.values())
        name = signal.Signals(code - EXIT_SIGNAL_BASE).name
        return LaunchError(f"stopped by {name}; a checkpoint was written\nresume with: {resume_command(run_dir)}", code)
    lines = []
    for rank, code in codes.items():
        log = run_dir / ("launch.log" if rank == 0 else f"logs/rank-{rank}.log")
        lines.append(f"rank {rank} failed with exit code {code} (log: {log})")
    first = next(iter(codes.values()))
    known = first if first in (EXIT_DATA, EXIT_CHECKPOINT, EXIT_NONFINITE, EXIT_COLLAPSE) else EXIT_FAILED
    return LaunchError("run failed: " + "\n".join(lines), known)
