"""Where a validated config runs.

local, nproc_per_node=1: in this process. local, nproc_per_node=N: N processes
on this machine through torch's elastic launcher (torchrun's engine); when one
rank fails the launcher stops the others and reports the rank, its exit code
and its log. slurm: a job through submitit (distill/slurm.py); in a Hydra
multirun the points are collected and submitted as one job array once all of
them have composed and validated.
"""

import os
import socket
import sys
import uuid
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from distill.config.io import save_config
from distill.config.schema import Config
from distill.worker import CONFIG_FILE


class LaunchError(RuntimeError):
    pass


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
    if config.launcher.name == "slurm":
        if hydra.mode == RunMode.MULTIRUN:
            PENDING_ARRAY.append((config.launcher, run_dir))
        else:
            submit_slurm(config.launcher, [run_dir], run_dir)
    elif config.launcher.nproc_per_node == 1:
        from distill.preemption import Preempted, StopRequest
        from distill.run import train

        try:
            train(config, run_dir, stop=StopRequest().install())
        except Preempted as stopped:
            raise LaunchError(f"{stopped}; launch again into {run_dir} to resume") from None
    else:
        run_local_processes(run_dir, config.launcher.nproc_per_node)


def submit_pending_array() -> None:
    """After a multirun with launcher=slurm: submit all its points as one array."""
    if not PENDING_ARRAY:
        return
    cfg = PENDING_ARRAY[0][0]
    run_dirs = [run_dir for _, run_dir in PENDING_ARRAY]
    PENDING_ARRAY.clear()
    submit_slurm(cfg, run_dirs, Path(os.path.commonpath([str(d) for d in run_dirs])))


def submit_slurm(cfg, run_dirs, folder: Path) -> None:
    from distill.slurm import report, submit

    jobs = submit(cfg, run_dirs, folder)
    if jobs and report(jobs, run_dirs, cfg.wait) != 0:
        raise LaunchError("a SLURM job failed (see above)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_local_processes(run_dir: Path, nproc: int) -> None:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    os.environ.setdefault("OMP_NUM_THREADS", "1")  # ranks share the cores
    launch_config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=uuid.uuid4().hex[:8],
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{free_port()}",
        max_restarts=0,
        monitor_interval=0.5,
    )
    try:
        elastic_launch(launch_config, sys.executable)("-m", "distill.worker", str(run_dir))
    except ChildFailedError as err:
        lines = []
        for rank, failure in sorted(err.failures.items()):
            log = run_dir / ("launch.log" if rank == 0 else f"logs/rank-{rank}.log")
            lines.append(f"rank {rank} failed with exit code {failure.exitcode} (log: {log})")
        raise LaunchError("\n".join(lines)) from None
