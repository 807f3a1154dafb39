"""Two experts by noise level (Wan2.2 A14B): one network for the trainer.

The diffusers layout holds `transformer` (the high-noise expert) and
`transformer_2` (the low-noise one); the pipeline runs the first at timesteps
t >= boundary_ratio * 1000 and the second below. `ExpertPair` does that per
sample, so a batch of mixed noise levels (DMD's score timesteps, the critic's)
goes to the right expert sample by sample, in rollouts and losses alike.

Sharded over several ranks, an expert's weights are gathered by all of them at
once: every rank must run an expert that any rank needs. The ranks agree on
which (one small all-reduce per forward), and a rank with no sample for an
expert another rank needs runs it on one of its samples and adds the output
times zero: the gathers match, the backward reaches the expert's shards with
zero gradient, and the results equal a single rank's.
"""

from typing import Tuple

import torch
import torch.distributed as dist
from torch import nn

HIGH, LOW = "high", "low"  # model.trained_experts names: transformer, transformer_2


def high_noise(timestep: torch.Tensor, boundary_timestep: float) -> torch.Tensor:
    """True where a sample is the high-noise expert's: its timestep ([B], or [B, tokens]:
    its largest) at or above the boundary, as the pipeline chooses."""
    t = timestep if timestep.dim() == 1 else timestep.amax(dim=1)
    return t >= boundary_timestep


class ExpertPair(nn.Module):
    def __init__(self, high: nn.Module, low: nn.Module, boundary_timestep: float):
        super().__init__()
        self.high, self.low = high, low
        self.boundary_timestep = boundary_timestep

    @property
    def config(self):
        """Both experts share one architecture; code that reads a network's config reads the high one's."""
        return self.high.config

    def experts(self) -> Tuple[Tuple[str, nn.Module], ...]:
        return (HIGH, self.high), (LOW, self.low)

    def enable_gradient_checkpointing(self, gradient_checkpointing_func=None) -> None:
        for _, expert in self.experts():
            expert.enable_gradient_checkpointing(gradient_checkpointing_func)

    def route(self, timestep: torch.Tensor) -> torch.Tensor:
        return high_noise(timestep, self.boundary_timestep)

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                return_dict: bool = False, **kwargs):
        high = self.route(timestep)
        needed = torch.stack([high.any(), (~high).any()]).to(torch.int32)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(needed, op=dist.ReduceOp.MAX)  # what any rank needs, every rank runs
        batch = hidden_states.shape[0]
        inputs = dict(hidden_states=hidden_states, timestep=timestep, encoder_hidden_states=encoder_hidden_states,
                      **kwargs)
        out, idle = None, []
        for (_, expert), mine, wanted in zip(self.experts(), (high, ~high), needed.tolist()):
            if not wanted:
                continue
            rows = mine.nonzero().flatten()
            if rows.numel() == 0:  # another rank needs it: run one sample, weigh it zero
                idle.append(expert(**_take(inputs, torch.zeros(1, dtype=torch.long, device=high.device), batch),
                                   return_dict=False)[0])
                continue
            y = expert(**_take(inputs, rows, batch), return_dict=False)[0]
            if out is None:
                out = y.new_zeros((batch, *y.shape[1:]))
            out = out.index_copy(0, rows, y)
        for y in idle:
            out = out + 0.0 * y.sum()
        return (out,)


def _take(inputs: dict, rows: torch.Tensor, batch: int) -> dict:
    """The listed samples of every per-sample tensor input."""
    return {k: v.index_select(0, rows) if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == batch else v
            for k, v in inputs.items()}
