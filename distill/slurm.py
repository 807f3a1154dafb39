"""Submitting runs to SLURM through submitit.

One run is one job of `nodes x tasks_per_node` tasks, one rank each; a sweep
is one job array, one element per point. Each task runs `job_entry`, which
turns submitit's job environment into the ranks' rendezvous and runs the
ordinary worker. Jobs import a snapshot of `distill/` taken at submission, so
editing the code cannot change a queued job.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

import submitit

from distill.config.schema import LauncherConfig

PACKAGE = Path(__file__).resolve().parent


def rendezvous_port(job_id: str) -> int:
    """The same port on every rank of a job, different for neighbouring jobs."""
    return 20000 + int(job_id) % 40000


def set_rank_environment() -> None:
    """torchrun's variables from submitit's job environment (this task's rank, the rendezvous)."""
    env = submitit.JobEnvironment()
    os.environ.update(
        MASTER_ADDR=env.hostnames[0],
        MASTER_PORT=str(rendezvous_port(os.environ["SLURM_JOB_ID"])),
        RANK=str(env.global_rank),
        WORLD_SIZE=str(env.num_tasks),
        LOCAL_RANK=str(env.local_rank),
    )


def job_entry(run_dir: str) -> None:
    """Runs on every SLURM task: set the ranks from submitit's environment, train."""
    set_rank_environment()
    from distill.worker import run_rank

    run_rank(run_dir)


def git_state() -> dict:
    """The checkout's git commit and whether distill/ differs from it ({"commit": None} outside git)."""
    repo = PACKAGE.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = bool(
            subprocess.run(["git", "status", "--porcelain", "distill"], cwd=repo, capture_output=True, text=True).stdout
        )
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None}
    return {"commit": commit, "dirty": dirty}


def code_version(run_dir: Path, snapshot: bool) -> dict:
    """Record the git commit (and whether the tree was dirty); copy distill/."""
    info = {"package": str(PACKAGE), **git_state()}
    if snapshot:
        target = run_dir / "code"
        shutil.copytree(PACKAGE, target / "distill", ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
        info["snapshot"] = str(target)
    (run_dir / "code_version.json").write_text(json.dumps(info, indent=1))
    return info


class DryRunExecutor(submitit.SlurmExecutor):
    """Writes the sbatch script on any machine: a dry run needs no srun."""

    @classmethod
    def affinity(cls) -> int:
        return 1


def missing_slurm() -> Optional[str]:
    """Why this machine cannot submit (no sbatch/srun on PATH), or None."""
    missing = [tool for tool in ("sbatch", "srun") if shutil.which(tool) is None]
    if missing:
        return (f"launcher=slurm: {' and '.join(missing)} not found on PATH; submit from a SLURM login node "
                "(launcher.dry_run=true prints the sbatch script anywhere)")
    return None


def make_executor(cfg: LauncherConfig, folder: Path, code_path: Optional[Path]) -> submitit.SlurmExecutor:
    kind = DryRunExecutor if cfg.dry_run else submitit.SlurmExecutor
    executor = kind(folder=str(folder), max_num_timeout=cfg.max_requeues)
    tasks = cfg.tasks_per_node or max(cfg.gpus_per_node, 1)
    setup = list(cfg.setup)
    if code_path is not None:
        # PYTHONSAFEPATH: `python -m` must not put the submission folder (often
        # the repo itself) ahead of the snapshot on sys.path (Python >= 3.11)
        setup[:0] = [f"export PYTHONPATH={code_path}:$PYTHONPATH", "export PYTHONSAFEPATH=1"]
    extra = dict(cfg.sbatch_extra)
    for key in ("account", "qos", "constraint", "exclude"):
        if getattr(cfg, key):
            extra[key] = getattr(cfg, key)
    params = dict(
        job_name=cfg.job_name,
        nodes=cfg.nodes,
        ntasks_per_node=tasks,
        cpus_per_task=cfg.cpus_per_task,
        time=cfg.time_min,
        signal_delay_s=cfg.signal_delay_s,
        setup=setup,
        additional_parameters=extra,
        array_parallelism=cfg.array_parallelism,
        srun_args=["--kill-on-bad-exit=1"],  # one failed rank ends the step
    )
    if cfg.partition:
        params["partition"] = cfg.partition
    if cfg.gpus_per_node:
        params["gpus_per_node"] = cfg.gpus_per_node
    if cfg.mem_gb:
        params["mem"] = f"{cfg.mem_gb}GB"
    executor.update_parameters(**params)
    return executor


def sbatch_script(executor: submitit.SlurmExecutor) -> str:
    return executor._make_submission_file_text("python -u -m submitit.core._submit <folder>", "dry-run")


def submit(cfg: LauncherConfig, run_dirs: List[Path], folder: Path) -> List[submitit.Job]:
    """One job for one run folder, a job array for several."""
    folder.mkdir(parents=True, exist_ok=True)
    snapshot = folder / "code" if cfg.snapshot_code else None
    for run_dir in run_dirs:
        code_version(run_dir, snapshot=False)
    if snapshot is not None:
        code_version(folder, snapshot=True)
    executor = make_executor(cfg, folder / "slurm", snapshot)
    if cfg.dry_run:
        print(sbatch_script(executor))
        return []
    if len(run_dirs) == 1:
        jobs = [executor.submit(job_entry, str(run_dirs[0]))]
    else:
        jobs = executor.map_array(job_entry, [str(d) for d in run_dirs])
    for job, run_dir in zip(jobs, run_dirs):
        (run_dir / "slurm_job.json").write_text(
            json.dumps({"job_id": job.job_id, "folder": str(folder / "slurm"), "stdout": str(job.paths.stdout),
                        "stderr": str(job.paths.stderr)}, indent=1)
        )
    return jobs


def report(jobs: List[submitit.Job], run_dirs: List[Path], wait: bool) -> int:
    """Print where each job writes; with wait, its outcome. Returns an exit code."""
    if len(jobs) > 1:
        print(f"submitted job array {jobs[0].job_id.split('_')[0]} with {len(jobs)} points")
    for job, run_dir in zip(jobs, run_dirs):
        print(f"job {job.job_id}: run folder {run_dir}")
        print(f"  logs: {job.paths.stdout} / {job.paths.stderr}")
    if not wait:
        return 0
    failed = 0
    for job, run_dir in zip(jobs, run_dirs):
        try:
            job.results()  # one result per task: any task that raised fails the job
            print(f"job {job.job_id} succeeded: {run_dir}")
        except Exception as err:  # submitit raises FailedJobError / UncompletedJobError
            failed += 1
            print(f"job {job.job_id} FAILED: {run_dir}\n  log: {failing_log(job)}\n{_tail(str(err))}", file=sys.stderr)
    print(f"{len(jobs) - failed} succeeded, {failed} failed")
    return 1 if failed else 0


def failing_log(job: submitit.Job) -> Path:
    """The stderr log of the first task whose log holds a traceback (else task 0's)."""
    folder = job.paths.folder
    for log in sorted(folder.glob(f"{job.job_id}_*_log.err")):
        if "Traceback" in log.read_text(errors="replace"):
            return log
    return job.paths.stderr


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join("  " + line for line in text.strip().splitlines()[-lines:])
