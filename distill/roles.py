"""Roles: each named network of a run with its trainability, precision,
optimizer, LR schedule and EMA. The method decides what a role is for."""

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Dict, Optional

import torch
from diffusers.optimization import get_scheduler
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from distill.config.schema import Config, Precision, RoleConfig
from distill.distributed import Runtime
from distill.ema import EMA
from distill.models import FlowMatchingAdapter
from distill.parallel import DTYPES, build_sharded


@dataclass
class Role:
    name: str
    cfg: RoleConfig
    module: nn.Module
    optimizer: Optional[torch.optim.Optimizer] = None
    scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None
    ema: Optional[EMA] = None

    @property
    def trainable(self) -> bool:
        return self.cfg.trainable

    @property
    def sharded(self) -> bool:
        return isinstance(self.module, FSDPModule)

    def autocast(self):
        """bf16 compute for an unsharded trainable role (FSDP2's policy does it otherwise)."""
        if self.trainable and self.cfg.precision == Precision.bf16 and not self.sharded:
            device_type = next(self.module.parameters()).device.type
            return torch.autocast(device_type, dtype=torch.bfloat16)
        return nullcontext()

    def sync_gradients(self, flag: bool) -> None:
        """With FSDP2, skip the gradient reduce-scatter on all but the last micro-batch."""
        if self.sharded and self.trainable:
            self.module.set_requires_gradient_sync(flag)

    def clip_and_step(self, step: int) -> float:
        """Clip the gradient, step optimizer, schedule and EMA; returns the pre-clip norm."""
        norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.max_grad_norm)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.module, step)
        return float(norm)

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]


def build_roles(config: Config, adapter: FlowMatchingAdapter, runtime: Runtime) -> Dict[str, Role]:
    roles = {}
    for name, cfg in config.roles.items():
        path = cfg.path or config.model.path
        if runtime.distributed:
            module = build_sharded(adapter, path, config.seed, cfg, runtime)
        else:
            module = adapter.load_transformer(path, seed=config.seed).to(runtime.device)
            if not cfg.trainable and DTYPES[cfg.precision] != torch.float32:
                module.to(DTYPES[cfg.precision])
        roles[name] = Role(name, cfg, _prepare(module, cfg))
        if cfg.trainable and cfg.ema_decay is not None:
            roles[name].ema = EMA(module, cfg.ema_decay, cfg.ema_start_step)
    return roles


def _prepare(module: nn.Module, cfg: RoleConfig) -> nn.Module:
    if cfg.activation_checkpointing and cfg.trainable:
        module.enable_gradient_checkpointing()
    if cfg.trainable:
        return module.train()
    return module.requires_grad_(False).eval()  # frozen: no grads, no optimizer


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
