"""The training loop: data, gradient accumulation, stepping the roles the
method names, logging, checkpoint cadence. It knows neither the model family
nor the losses.

Between log steps the loop reads nothing back from the device: losses,
metrics and gradient norms stay device tensors, summed in a window that is
averaged over ranks and read once per log line (`MetricWindow`). The step
time of a log line is the window's wall time over its iterations, measured
after that read, so queued GPU work is counted."""

import math
import signal
import time
from pathlib import Path
from typing import Dict, Iterator, Optional

import torch
import torch.distributed as dist

from distill.distributed import Runtime
from distill.methods import Method
from distill.preemption import Preempted, StopRequest
from distill.run_health import Collapse, NonFiniteLoss
from distill.roles import Role
from distill.tracking import MetricWindow, Tracker, log, peak_memory_gb

# batch entries the loop keeps on the host: which samples these are (the noise is drawn per id)
HOST_KEYS = ("sample_id",)


class Trainer:
    def __init__(
        self,
        method: Method,
        roles: Dict[str, Role],
        data: Iterator[Dict[str, torch.Tensor]],
        run_dir: Path,
        max_steps: int,
        grad_accum_steps: int = 1,
        log_every: int = 1,
        runtime: Optional[Runtime] = None,
        checkpointer=None,
        stop: Optional[StopRequest] = None,
        tracker: Optional[Tracker] = None,
        samples_per_step: int = 0,
        validator=None,
        validation_every: int = 0,
        evaluation=None,
    ):
        self.method = method
        self.roles = roles
        self.data = data
        self.run_dir = Path(run_dir)
        self.max_steps = max_steps
        self.grad_accum_steps = grad_accum_steps
        self.log_every = log_every
        self.runtime = runtime or Runtime()
        self.checkpointer = checkpointer
        self.stop = stop
        self.step = 0
        self.tracker = tracker or Tracker(self.run_dir, enabled=self.runtime.is_main)
        self.samples_per_step = samples_per_step
        self.validator = validator
        self.validation_every = validation_every
        self.validated_at = -1
        self.evaluation = evaluation  # validation.evaluate.every (distill/evaluation/live.py)
        self.evaluated_at = -1
        self.window = MetricWindow()
        self.window_started = 0.0
        self.window_steps = 0

    def fit(self) -> None:
        log.info("training steps %d..%d", self.step + 1, self.max_steps)
        while self.step < self.max_steps:
            self.advance()
            if self.checkpointer and self.checkpointer.due(self.step):
                self.checkpointer.save(self.step)
            if self.validator and self.validation_every and self.step % self.validation_every == 0:
                self.validate()
            if self.evaluation and self.step % self.evaluation.every == 0:
                self.evaluate()
            if self.stop is not None and self.runtime.any_rank(self.stop.requested):
                self._save_once()
                raise Preempted(self.step, self.stop.signum or signal.SIGTERM)
        self._save_once()

    def validate(self) -> Dict[str, float]:
        """Samples and metrics at this step (every rank samples: the roles are sharded)."""
        if self.validator is None or self.validated_at == self.step:
            return {}
        self.validated_at = self.step
        metrics, images, videos = self.validator.run(self.roles, self.step)
        self.tracker.log_media(self.step, images, videos)
        if metrics and self.runtime.is_main:
            self.tracker.log(self.step, metrics, force=True)
        self.check_health(self.validator.findings if self.runtime.is_main else [])
        return metrics

    def evaluate(self) -> Dict[str, float]:
        """The prompt-file evaluation of the live student at this step (every rank samples)."""
        if self.evaluation is None or self.evaluated_at == self.step:
            return {}
        self.evaluated_at = self.step
        metrics = self.evaluation.run(self.roles, self.step)
        if metrics and self.runtime.is_main:
            self.tracker.log(self.step, metrics, force=True)
        return metrics

    def check_health(self, found) -> None:
        """Say what the student looks like against the teacher (rank 0's findings), and
        with validation.stop_on_collapse end the run here, with a checkpoint."""
        for line in found:
            log.warning("health at step %d: the student looks %s", self.step, line)
            self.tracker.alert(f"student {line.split(':')[0]} at step {self.step}", line)
        if self.validator.cfg.stop_on_collapse and self.runtime.any_rank(bool(found)):
            self._save_once()
            raise Collapse(self.step, found or ["see rank 0's log"])

    def _save_once(self) -> None:
        """The checkpoint of this step, complete on disk when this returns."""
        if self.checkpointer:
            self.checkpointer.wait()  # a background write of this very step counts
            if not self.checkpointer.path(self.step).exists():
                self.checkpointer.save(self.step)
            self.checkpointer.wait()

    # --- a checkpoint part: the counters --------------------------------------
    def state_dict(self) -> Dict[str, int]:
        return {"step": self.step}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.step = state["step"]

    def advance(self) -> None:
        """One iteration; a log line at log steps."""
        if not self.window_steps:
            self.window_started = time.perf_counter()
        record = self.train_step(self.step)
        self.step += 1
        self.window_steps += 1
        record["peak_memory_gb"] = peak_memory_gb(self.runtime.device)
        self.window.add(record)
        self.tracker.progress(self.step)
        if self.step % self.log_every == 0 or self.step == self.max_steps:
            self.log_window()

    def log_window(self) -> None:
        """The window's log line; a NaN or inf loss in it stops the run here (the losses
        are read back only at log lines, so with log_every=1 at the very step)."""
        metrics = self.window.flush(self._mean_over_ranks)
        elapsed = time.perf_counter() - self.window_started
        metrics["step_time"] = elapsed / self.window_steps
        if self.samples_per_step:
            metrics["samples_per_s"] = self.samples_per_step * self.window_steps / elapsed
        first_step, self.window_steps = self.step - self.window_steps + 1, 0
        self.tracker.log(self.step, metrics)
        bad = [f"{key}={metrics[key]}" for key in metrics if key.startswith("loss/") and not math.isfinite(metrics[key])]
        if bad:
            if self.checkpointer:
                self.checkpointer.wait()  # a save in flight is of an earlier, finite step
            raise NonFiniteLoss(self.step, first_step, bad, self.checkpointer and self.checkpointer.latest())

    def train_step(self, iteration: int) -> Dict[str, object]:
        """One iteration's record: device tensors (losses, metrics, gradient norms) and host numbers."""
        record: Dict[str, object] = {}
        for micro in range(self.grad_accum_steps):
            last = micro == self.grad_accum_steps - 1
            for role in self.roles.values():
                role.sync_gradients(last)
            losses, metrics = self.method.step_losses(self.next_batch(), iteration, self.next_batch)
            sum(losses.values()).div(self.grad_accum_steps).backward()
            for key, value in [*((f"loss/{n}", l.detach()) for n, l in losses.items()), *metrics.items()]:
                record[key] = record.get(key, 0.0) + value / self.grad_accum_steps
        for name in self.method.roles_to_step(iteration):
            role = self.roles[name]
            record[f"lr/{name}"] = role.lr()
            record[f"grad_norm/{name}"] = role.clip_and_step(iteration + 1)
        for role in self.roles.values():
            if role.trainable:
                role.end_iteration(iteration)
        return record

    def next_batch(self) -> Dict[str, torch.Tensor]:
        return {k: v if k in HOST_KEYS else v.to(self.runtime.device, non_blocking=True)
                for k, v in next(self.data).items()}

    def _mean_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        if self.runtime.distributed:
            values = values.to(self.runtime.device if self.runtime.device.type == "cuda" else "cpu")
            dist.all_reduce(values)
            values = values / self.runtime.world_size
        return values
