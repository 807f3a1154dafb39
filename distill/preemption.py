"""Stopping at a step boundary on a signal, and requeueing under SLURM.

SLURM signals every task of a job (SIGUSR2 `signal_delay_s` before the time
limit, SIGTERM on preemption). Each rank only records the signal; the trainer
asks all ranks at each step boundary whether any got one (one tiny
all-reduce), and if so they write a checkpoint together and stop. Then rank 0
requeues the job, which resumes from that checkpoint in the same run folder.
"""

import logging
import os
import signal
import subprocess

log = logging.getLogger("distill")


class Preempted(Exception):
    def __init__(self, step: int, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; a checkpoint was written")
        self.step = step
        self.signum = signum


class StopRequest:
    """Set by SIGUSR2, SIGTERM or Ctrl-C (SIGINT); read by the trainer at step
    boundaries. A second Ctrl-C interrupts at once, without a checkpoint."""

    def __init__(self):
        self.signum = None

    def install(self) -> "StopRequest":
        for sig in (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signum is None:
            log.warning("caught %s: writing a checkpoint and stopping at the next step boundary%s",
                        signal.Signals(signum).name, " (Ctrl-C again to stop at once)" if signum == signal.SIGINT else "")
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None


def slurm_job_id() -> str:
    """The id `scontrol requeue` takes: ARRAYID_TASK for an array element."""
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ["SLURM_JOB_ID"]


def requeue(max_requeues: int) -> None:
    """Requeue this SLURM job, or raise when it has been requeued max_requeues times."""
    count = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    if count >= max_requeues:
        raise RuntimeError(
            f"preempted after {count} requeues (launcher.max_requeues={max_requeues}); "
            "the checkpoint is kept: launch again into the same run folder to resume"
        )
    job = slurm_job_id()
    subprocess.run(["scontrol", "requeue", job], check=True, timeout=60)
    log.info("requeued job %s (requeue %d of at most %d)", job, count + 1, max_requeues)
