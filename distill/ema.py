"""Exponential moving average of a role's weights, shard-local under FSDP2."""

from typing import Dict

import torch
from torch import nn
from torch.distributed.tensor import DTensor


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class EMA:
    def __init__(self, module: nn.Module, decay: float, start_step: int = 0):
        self.decay = decay
        self.start_step = start_step
        # same names, types (DTensor shards under FSDP2) and dtypes as the weights
        self.shadow: Dict[str, torch.Tensor] = {
            name: p.detach().clone().float() for name, p in module.named_parameters() if p.requires_grad
        }

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        """After optimizer step `step` (1-based): copy before start_step, average after.
        One foreach lerp over all tensors (a few kernels, not one per parameter)."""
        weight = 1.0 if step <= self.start_step else 1.0 - self.decay
        pairs = [(_local(self.shadow[n]), _local(p.detach())) for n, p in module.named_parameters() if n in self.shadow]
        if pairs:
            shadows, params = zip(*pairs)
            torch._foreach_lerp_(list(shadows), [p.float() for p in params], weight)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return self.shadow

    @torch.no_grad()
    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        for name, value in state.items():
            if value is not self.shadow[name]:
                _local(self.shadow[name]).copy_(_local(value))
