"""Which runs of a SLURM submission (one run or a sweep) succeeded or failed.

    python -m distill.status RUN_OR_SWEEP_FOLDER

Reads each run folder's slurm_job.json, asks SLURM for the job's state
(through submitit, i.e. sacct) and prints one line per run; exits 1 when any
run failed.
"""

import json
import sys
from pathlib import Path

import submitit


def run_state(run_dir: Path) -> str:
    info = json.loads((run_dir / "slurm_job.json").read_text())
    job = submitit.SlurmJob(folder=info["folder"], job_id=info["job_id"])
    state = job.state
    if (run_dir / "export").is_dir() and state in ("COMPLETED", "UNKNOWN"):
        return "succeeded"
    if state in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY") or state.startswith("CANCELLED"):
        return f"failed ({state}; log {info['stderr']})"
    if state == "COMPLETED":
        return f"failed (completed without an export; log {info['stderr']})"
    return state.lower()


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
