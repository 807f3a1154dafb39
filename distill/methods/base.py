"""What every method gives the trainer."""

from abc import ABC, abstractmethod
from typing import Dict, List, Tuple

import torch

from distill.models import FlowMatchingAdapter
from distill.roles import Role

Losses = Dict[str, torch.Tensor]  # role name -> loss whose backward reaches only that role
Metrics = Dict[str, float]


class Method(ABC):
    def __init__(self, cfg, adapter: FlowMatchingAdapter, roles: Dict[str, Role], seed: int, rank: int, device):
        self.cfg = cfg
        self.adapter = adapter
        self.roles = roles
        self.device = torch.device(device)
        # Choices every rank must make alike (how many forward passes a rollout
        # runs) come from `shared_rng`; noise differs per rank via `rng`.
        self.shared_rng = torch.Generator().manual_seed(seed)
        self.rng = torch.Generator(self.device).manual_seed(seed + 1_000_003 * (rank + 1))

    @abstractmethod
    def losses(self, batch: Dict[str, torch.Tensor], iteration: int) -> Tuple[Losses, Metrics]:
        """Losses of one micro-batch; the trainer runs backward on their sum."""

    @abstractmethod
    def roles_to_step(self, iteration: int) -> List[str]:
        """The roles whose optimizer and LR schedule step after this iteration."""

    def updates_per_role(self, max_steps: int) -> Dict[str, int]:
        counts = {name: 0 for name in self.roles}
        for iteration in range(max_steps):
            for name in self.roles_to_step(iteration):
                counts[name] += 1
        return counts

    # --- shared helpers ----------------------------------------------------
    def randn(self, shape) -> torch.Tensor:
        return torch.randn(shape, generator=self.rng, device=self.device)

    def rand(self, n: int) -> torch.Tensor:
        return torch.rand(n, generator=self.rng, device=self.device)

    def state_dict(self) -> dict:
        return {"shared_rng": self.shared_rng.get_state(), "rng": self.rng.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.shared_rng.set_state(state["shared_rng"])
        self.rng.set_state(state["rng"])
