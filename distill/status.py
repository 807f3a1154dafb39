"""Which runs of a SLURM submission (one run or a sweep) succeeded or failed.

    python -m distill.status RUN_OR_SWEEP_FOLDER

Reads each run folder's slurm_job.json; a finished job is judged by its
result files (an exception in any task is a failure), a running one by
SLURM's state (through submitit, i.e. sacct). One line per run; exits 1 when
any run failed.
"""

import json
import sys
from pathlib import Path

import submitit


def run_state(run_dir: Path) -> str:
    """succeeded / failed (from the job's result files) or SLURM's state while it runs."""
    info = json.loads((run_dir / "slurm_job.json").read_text())
    job = submitit.SlurmJob(folder=info["folder"], job_id=info["job_id"])
    if job.done():
        error = job.exception()
        if error is None:
            return "succeeded"
        return f"failed ({type(error).__name__}; log {info['stderr']})"
    return job.state.lower()


def main(argv=None) -> int:
    folder = Path((argv or sys.argv[1:])[0])
    runs = sorted(p.parent for p in folder.rglob("slurm_job.json"))
    if not runs:
        print(f"error: no slurm_job.json under {folder}", file=sys.stderr)
        return 2
    states = {run: run_state(run) for run in runs}
    for run, state in states.items():
        print(f"{run}: {state}")
    failed = sum(s.startswith("failed") for s in states.values())
    print(f"{sum(s == 'succeeded' for s in states.values())} succeeded, {failed} failed, {len(runs)} runs")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
