"""Metrics to a JSON-lines file in the run folder and to the log."""

import json
import logging
import math
from pathlib import Path
from typing import Dict

log = logging.getLogger("distill")


class MetricsWriter:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.file = open(self.path, "a")

    def write(self, step: int, metrics: Dict[str, float]) -> None:
        record = {"step": step, **metrics}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        log.info("step %d %s", step, " ".join(f"{k}={_fmt(v)}" for k, v in metrics.items()))

    def close(self) -> None:
        self.file.close()


def _fmt(value) -> str:
    if isinstance(value, float) and math.isfinite(value) and value != 0 and abs(value) < 1e-3:
        return f"{value:.3e}"
    return f"{value:.4f}" if isinstance(value, float) else str(value)
