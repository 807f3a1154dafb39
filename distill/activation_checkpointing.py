"""Activation checkpointing of a role's blocks (roles.<r>.activation_checkpointing).

full: each block keeps only its input and runs again in the backward
(diffusers' own checkpoint function). selective: torch's selective activation
checkpointing inside each block: the outputs of attention and of the matmuls,
the expensive ops, are kept; what lies between them (norms, modulation,
activation functions, RoPE, residual sums) is recomputed, so the backward runs
no matmul twice."""

import functools
from typing import Callable, Optional

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from distill.config.schema import Checkpointing

_aten = torch.ops.aten
KEPT_OPS = {
    getattr(_aten, name).default
    for name in ("mm", "addmm", "bmm", "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                 "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu")
    if hasattr(_aten, name)
}


def _keep_expensive(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in KEPT_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def selective_checkpoint(module: nn.Module, *args):
    """A block's forward under selective checkpointing (the signature diffusers calls)."""
    contexts = functools.partial(create_selective_checkpoint_contexts, _keep_expensive)
    return checkpoint(module.__call__, *args, use_reentrant=False, context_fn=contexts)


def checkpoint_function(mode: Checkpointing) -> Optional[Callable]:
    """What `enable_gradient_checkpointing` takes; None: diffusers' full checkpoint."""
    return selective_checkpoint if mode == Checkpointing.selective else None


def enable(module: nn.Module, mode: Checkpointing) -> nn.Module:
    if mode != Checkpointing.none:
        module.enable_gradient_checkpointing(checkpoint_function(mode))
    return module
