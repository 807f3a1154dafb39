"""A method entry: everything the rest of the project asks of a method.

The class carries what is known before anything is built (config class,
roles, checks, batch keys, how each trained role samples); an instance
computes losses and says which roles step. Nothing outside distill/methods/
looks at a method's config type.
"""

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, List, Optional, Set, Tuple

import torch

from distill.sampling import EulerSampler, Sampler

Losses = Dict[str, torch.Tensor]  # role name -> loss whose backward reaches only that role
Metrics = Dict[str, float]

DEFAULT_SAMPLING_STEPS = 50
TEXT_KEYS = frozenset({"text_embeds", "negative_text_embeds"})


@dataclass
class Forward:
    """One forward of a role over `samples` x data.batch_size samples (CFG doubles it);
    with `grad`, its activations stay until the backward; with `tangent`, each
    activation has its tangent beside it while the block runs."""

    role: str
    samples: int = 1
    grad: bool = True
    tangent: bool = False  # a forward-mode JVP (distill/jvp.py): a tangent beside each activation


@dataclass
class MemoryPhase:
    """What one kind of training iteration holds at once, for the memory plan:
    the gradients of the roles it steps and the forwards it runs, in order."""

    name: str
    stepping: List[str]
    forwards: List[Forward] = field(default_factory=list)


class Method(ABC):
    config_class: ClassVar[type]  # a dataclass deriving from MethodConfig; its `name` is the method's
    roles: ClassVar[Dict[str, bool]] = {}  # role name -> trainable

    # --- what is known from the config alone ----------------------------------
    @classmethod
    def check(cls, cfg) -> List[str]:
        """Errors of this method's config, each naming its key."""
        return []

    @classmethod
    def check_model(cls, cfg, model) -> List[str]:
        """Errors of this method's config that depend on the model section (ModelConfig)."""
        return []

    @classmethod
    def check_parallel(cls, cfg, parallel) -> List[str]:
        """Errors of this method's config that depend on the parallel section (ParallelConfig)."""
        return []

    @classmethod
    def block_indices(cls, cfg) -> Dict[str, Tuple[str, List[int]]]:
        """Config key -> (role, indices of that role's network blocks it names), so that
        an index outside the network's depth is refused before anything is built."""
        return {}

    @classmethod
    def check_roles(cls, roles) -> List[str]:
        """Errors of the roles section (name -> RoleConfig) for this method, each naming its key."""
        return []

    @classmethod
    def batch_keys(cls, cfg) -> Set[str]:
        """The batch entries the losses read ("latents" needs a dataset with latents)."""
        return set(TEXT_KEYS)

    @classmethod
    def lr_keys(cls, cfg) -> Dict[str, str]:
        """Role name -> the key of this method's config that holds its learning rate
        (the one place it is set; roles.<r>.optimizer.lr stays null)."""
        return {}

    @classmethod
    def guidance_scale(cls, cfg) -> float:
        """The CFG scale the method's teacher uses (1: none)."""
        return 1.0

    @classmethod
    def role_modules(cls, cfg, adapter, role: str, network) -> Dict[str, Any]:
        """Extra trainable modules the method attaches to a role's network (name ->
        nn.Module, built from the seeded global RNG), e.g. a GAN head on the critic.
        They shard, optimise, average and checkpoint with the role; export leaves them out."""
        return {}

    @classmethod
    def fingerprint(cls, cfg) -> Dict[str, Any]:
        """Config values that shape the tensors a checkpoint holds (a resume must match them)."""
        return {}

    @classmethod
    def memory_phases(cls, cfg) -> List[MemoryPhase]:
        """The kinds of iteration and what each holds (distill/plan.py): by default
        one, stepping every trained role after one forward each."""
        trained = [name for name, trainable in cls.roles.items() if trainable]
        return [MemoryPhase("step", trained, [Forward(name) for name in trained])]

    @classmethod
    def sampler(cls, cfg, adapter, role: str) -> Sampler:
        """How a trained role samples, for validation and export: by default
        the flow-matching Euler ODE with the method's guidance."""
        return EulerSampler(adapter.euler_sigmas(DEFAULT_SAMPLING_STEPS), cls.guidance_scale(cfg))

    # --- training ---------------------------------------------------------------
    def __init__(self, cfg, adapter, roles: Dict[str, Any], seed: int, device):
        self.cfg = cfg
        self.adapter = adapter
        self.roles = roles
        self.device = torch.device(device)
        # Choices every rank must make alike (how many forward passes a rollout
        # runs) come from `shared_rng`, seeded alike on all ranks.
        self.shared_rng = torch.Generator().manual_seed(seed)
        # Noise and sigmas come from `noise`: per sample, so the same on any
        # number of ranks, and a pure function of the data position.
        self.noise = SampleNoise(seed, self.device)

    def step_losses(self, batch: Dict[str, torch.Tensor], iteration: int,
                    next_batch: Optional[Callable[[], Dict[str, torch.Tensor]]] = None) -> Tuple[Losses, Metrics]:
        """The losses of one micro-step. `next_batch()` hands out a further batch, for
        a method whose iteration reads two (DMD2's critic_sample=fresh_batch)."""
        self.noise.start(batch["sample_id"].tolist())
        return self.losses(batch, iteration)

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
        return self.noise.draw(torch.randn, shape)

    def rand(self, n: int) -> torch.Tensor:
        return self.noise.draw(torch.rand, (n,))

    def randint(self, high: int, shape) -> torch.Tensor:
        """Integers in [0, high), drawn per sample like the noise (any rank count alike)."""
        return self.noise.draw(lambda size, **kw: torch.randint(high, size, **kw), shape)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {"shared_rng": self.shared_rng.get_state()}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        self.shared_rng.set_state(state["shared_rng"])


_MASK = (1 << 64) - 1


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 rounds)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = ((h ^ (v & _MASK)) * 0xBF58476D1CE4E5B9) & _MASK
        h ^= h >> 31
    return h & ((1 << 63) - 1)


class SampleNoise:
    """Random draws seeded by (run seed, sample position, draw number).

    A sample's noise does not depend on which rank holds it or how many ranks
    there are, and a resumed run redraws it exactly from the data position.
    """

    def __init__(self, seed: int, device: torch.device):
        self.seed = seed
        self.device = device
        self.generator = torch.Generator(device)
        self.start([0])

    def start(self, sample_ids: List[int]) -> None:
        self.sample_ids = sample_ids
        self.count = 0

    def draw(self, fn, shape) -> torch.Tensor:
        if shape[0] != len(self.sample_ids):
            raise ValueError(f"draw of {shape[0]} rows for a batch of {len(self.sample_ids)} samples")
        rows = []
        for sample_id in self.sample_ids:
            self.generator.manual_seed(_mix(self.seed, sample_id, self.count))
            rows.append(fn(tuple(shape[1:]), generator=self.generator, device=self.device))
        self.count += 1
        return torch.stack(rows)
