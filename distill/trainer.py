"""The training loop: data, gradient accumulation, stepping the roles the
method names, logging. It knows neither the model family nor the losses."""

import time
from collections import defaultdict
from pathlib import Path
from typing import Dict, Iterator

import torch
from safetensors.torch import save_file

from distill.methods import Method
from distill.roles import Role
from distill.tracking import MetricsWriter, log


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
        device: torch.device = torch.device("cpu"),
    ):
        self.method = method
        self.roles = roles
        self.data = data
        self.run_dir = Path(run_dir)
        self.max_steps = max_steps
        self.grad_accum_steps = grad_accum_steps
        self.log_every = log_every
        self.device = device
        self.step = 0
        self.metrics = MetricsWriter(self.run_dir)

    def fit(self) -> None:
        log.info("training %d steps from step %d", self.max_steps, self.step)
        while self.step < self.max_steps:
            self.advance()
        self.metrics.close()

    def advance(self) -> None:
        """One iteration and its log line."""
        start = time.perf_counter()
        record = self.train_step(self.step)
        self.step += 1
        if self.step % self.log_every == 0 or self.step == self.max_steps:
            record["step_time"] = time.perf_counter() - start
            self.metrics.write(self.step, record)

    def train_step(self, iteration: int) -> Dict[str, float]:
        totals = defaultdict(float)
        for _ in range(self.grad_accum_steps):
            batch = {k: v.to(self.device, non_blocking=True) for k, v in next(self.data).items()}
            losses, metrics = self.method.losses(batch, iteration)
            sum(losses.values()).div(self.grad_accum_steps).backward()
            for name, loss in losses.items():
                totals[f"loss/{name}"] += loss.item() / self.grad_accum_steps
            for key, value in metrics.items():
                totals[key] += value / self.grad_accum_steps
        for name in self.method.roles_to_step(iteration):
            role = self.roles[name]
            totals[f"lr/{name}"] = role.lr()
            totals[f"grad_norm/{name}"] = role.clip_and_step()
        return dict(totals)

    def save_trainable(self, folder: Path) -> None:
        """Each trainable role's weights as <folder>/<role>.safetensors."""
        folder.mkdir(parents=True, exist_ok=True)
        for name, role in self.roles.items():
            if role.trainable:
                state = {k: v.detach().cpu().contiguous() for k, v in role.module.state_dict().items()}
                save_file(state, str(folder / f"{name}.safetensors"))
