"""DMD2's GAN term: a small head on a network's block features tells real
latents from student samples, both noised to the same sigma with the same
noise (FastGen's `gan_use_same_t_noise`).

    discriminator: softplus(-D(real)) + softplus(D(fake))    (fake detached: never reaches the student)
    generator:     softplus(-D(fake))                         (the feature network and head frozen)
    approximate R1 (APT, Lin et al. 2025): mse(D(x_t), D(x_t + alpha * eps)), features of the second without grad

D(x) = the head on the outputs of `gan.blocks` of the feature network (the
critic, as DMD2 does, or the frozen teacher, as FastGen's Wan recipe does).
The head scores every token with a two-layer MLP over the chosen blocks'
features and averages the scores: one logit per sample.
"""

from dataclasses import dataclass, field
from typing import List

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class GanConfig:
    enabled: bool = False
    # the network whose block outputs the head reads: critic (DMD2) or teacher (FastGen's Wan recipe)
    features: str = "critic"
    blocks: List[int] = field(default_factory=lambda: [-1])  # block indices; negative counts from the end
    head_hidden: int = 256  # the head MLP's hidden width
    generator_weight: float = 3e-3  # on the student's GAN term, beside the DMD loss (weight 1)
    discriminator_weight: float = 1e-2  # on the head's loss, beside the critic's flow-matching loss (weight 1)
    # true: the discriminator gradient also reaches the critic's trunk; false: the head only
    trunk_grad: bool = False
    r1_weight: float = 0.0  # approximate R1 on real inputs (0: off)
    r1_alpha: float = 0.1  # the perturbation's scale


def check_gan(cfg: GanConfig, key: str = "method.gan") -> List[str]:
    if not cfg.enabled:
        return []
    errors = []
    if cfg.features not in ("critic", "teacher"):
        errors.append(f"{key}.features={cfg.features}: must be critic or teacher")
    if not cfg.blocks:
        errors.append(f"{key}.blocks is empty: list the block indices the head reads")
    if cfg.head_hidden < 1:
        errors.append(f"{key}.head_hidden={cfg.head_hidden}: must be >= 1")
    for name in ("generator_weight", "discriminator_weight", "r1_weight", "r1_alpha"):
        if getattr(cfg, name) < 0:
            errors.append(f"{key}.{name}={getattr(cfg, name)}: must be >= 0")
    if cfg.trunk_grad and cfg.features == "teacher":
        errors.append(f"{key}.trunk_grad=true: the teacher is frozen; only features=critic has a trunk to train")
    return errors


class GanHead(nn.Module):
    """Per-token MLP over the concatenated block features, averaged over tokens."""

    def __init__(self, hidden_size: int, num_blocks: int, head_hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size * num_blocks, elementwise_affine=False)
        self.fc1 = nn.Linear(hidden_size * num_blocks, head_hidden)
        self.fc2 = nn.Linear(head_hidden, 1)

    def forward(self, features: List[torch.Tensor]) -> torch.Tensor:
        """[B, tokens, hidden] per block -> logits [B]."""
        # at the head's own dtype: FSDP2's policy gives its weights (and inputs) the role's compute precision
        x = self.norm(torch.cat(features, dim=-1).to(self.fc1.weight.dtype))
        return self.fc2(F.silu(self.fc1(x))).squeeze(-1).mean(dim=-1)


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def generator_gan_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    return F.softplus(-fake_logits).mean()


def approximate_r1(real_logits: torch.Tensor, perturbed_logits: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(real_logits, perturbed_logits)


def through_input_only(loss: torch.Tensor, leaf: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A stand-in for `loss` computed from `leaf` (a detached copy of `x`): same value,
    and its gradient reaches x's graph (the student) by d loss / d leaf, while the
    networks between leaf and loss get no parameter gradient."""
    (grad,) = torch.autograd.grad(loss, leaf)
    carried = (x.float() * grad.float()).sum()
    return carried - carried.detach() + loss.detach()
