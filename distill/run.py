"""Build everything a config names and train it in this process."""

from pathlib import Path

import torch

from distill.config.schema import Config
from distill.data import build_data
from distill.methods import build_method
from distill.models import build_adapter
from distill.roles import attach_optimizers, build_roles
from distill.tracking import log
from distill.trainer import Trainer


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_trainer(config: Config, run_dir: Path) -> Trainer:
    if config.training.torch_threads:
        torch.set_num_threads(config.training.torch_threads)
    device = pick_device(config.training.device)
    adapter = build_adapter(config.model)
    roles = build_roles(config, adapter, device)
    method = build_method(config, adapter, roles, device)
    attach_optimizers(roles, method.updates_per_role(config.training.max_steps))
    for name, role in roles.items():
        count = sum(p.numel() for p in role.module.parameters())
        log.info("role %s: %.3fM parameters, %s", name, count / 1e6, "trainable" if role.trainable else "frozen")
    return Trainer(
        method,
        roles,
        build_data(config),
        run_dir,
        max_steps=config.training.max_steps,
        grad_accum_steps=config.training.grad_accum_steps,
        log_every=config.training.log_every,
        device=device,
    )


def train(config: Config, run_dir: Path) -> Trainer:
    trainer = build_trainer(config, run_dir)
    trainer.fit()
    trainer.save_trainable(Path(run_dir) / "final")
    log.info("run folder: %s", run_dir)
    return trainer
