"""Roles: each named network of a run with its trainability, precision,
optimizer and LR schedule. The method decides what a role is for."""

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Dict, Optional

import torch
from diffusers.optimization import get_scheduler
from torch import nn

from distill.config.schema import Config, Precision, RoleConfig
from distill.models import FlowMatchingAdapter

DTYPES = {Precision.fp32: torch.float32, Precision.bf16: torch.bfloat16}


@dataclass
class Role:
    name: str
    cfg: RoleConfig
    module: nn.Module
    optimizer: Optional[torch.optim.Optimizer] = None
    scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None

    @property
    def trainable(self) -> bool:
        return self.cfg.trainable

    def autocast(self):
        """bf16 compute for a trainable role whose master weights stay fp32."""
        if self.trainable and self.cfg.precision == Precision.bf16:
            device_type = next(self.module.parameters()).device.type
            return torch.autocast(device_type, dtype=torch.bfloat16)
        return nullcontext()

    def clip_and_step(self) -> float:
        """Clip the gradient, step optimizer and schedule; returns the pre-clip norm."""
        norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]


def build_roles(config: Config, adapter: FlowMatchingAdapter, device: torch.device) -> Dict[str, Role]:
    roles = {}
    for name, cfg in config.roles.items():
        module = adapter.load_transformer(cfg.path or config.model.path, seed=config.seed)
        roles[name] = Role(name, cfg, _prepare(module, cfg, device))
    return roles


def _prepare(module: nn.Module, cfg: RoleConfig, device: torch.device) -> nn.Module:
    module.to(device)
    if cfg.activation_checkpointing and cfg.trainable:
        module.enable_gradient_checkpointing()
    if cfg.trainable:
        return module.train()
    # a frozen role holds its weights at compute precision and never needs grads
    if DTYPES[cfg.precision] != torch.float32:
        module.to(DTYPES[cfg.precision])
    return module.requires_grad_(False).eval()


def attach_optimizers(roles: Dict[str, Role], updates: Dict[str, int]) -> None:
    """AdamW and an LR schedule for each trainable role.

    `updates[name]` is how many optimizer steps the role takes in the run; a
    schedule without total_steps spans exactly those.
    """
    for name, role in roles.items():
        if not role.trainable:
            continue
        opt = role.cfg.optimizer
        role.optimizer = torch.optim.AdamW(
            role.module.parameters(), lr=opt.lr, betas=tuple(opt.betas), weight_decay=opt.weight_decay, eps=opt.eps
        )
        sched = role.cfg.scheduler
        role.scheduler = get_scheduler(
            sched.name.value,
            role.optimizer,
            num_warmup_steps=sched.warmup_steps,
            num_training_steps=sched.total_steps or max(updates[name], 1),
        )
