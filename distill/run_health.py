"""How a run stops when it has gone wrong: a loss that is NaN or infinite, or
(distill/validation/health.py) samples that have collapsed. Each is an
exception the trainer raises and launch.py turns into its own exit code."""

from pathlib import Path
from typing import List, Optional


class NonFiniteLoss(RuntimeError):
    """A loss of the last log window is NaN or inf: the run stops at that log line, and
    no checkpoint of the state is written (it would hold the damage)."""

    def __init__(self, step: int, first_step: int, losses: List[str], last_good: Optional[Path]):
        window = f"step {step}" if first_step == step else f"steps {first_step}-{step}"
        where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written before it"
        super().__init__(f"{', '.join(losses)} at {window}: the run stopped without saving this state; {where}")
        self.step = step


class Collapse(RuntimeError):
    """validation.stop_on_collapse: the student's samples left the band around the
    teacher's (static, flat-coloured, or all alike); a checkpoint was written."""

    def __init__(self, step: int, findings: List[str]):
        super().__init__(f"the student collapsed at step {step} ({'; '.join(findings)}); a checkpoint was written")
        self.step = step
