"""Self-Forcing DMD (Huang et al. 2025): DMD2 on videos the block-causal student
generated itself, chunk by chunk over its KV cache, exactly as at inference.

Everything of DMD2 carries over (real and fake scores, critic, CFG, update
interval, timestep clamps, EMA, the GAN term); only the student's sample
changes. Chunk k runs the listed steps down to a random exit step, the same
on every rank; its x0 there is the chunk, and only that forward keeps a
gradient. The cache of the chunks before it holds their keys and values from
the generated chunk, re-noised to `context_timestep` (0: clean, as
Self-Forcing does), computed without gradient.

The teacher and the critic are full-attention networks; the student is the
model family's block-causal variant (roles.student.causal=true, chunks of
model.chunk_frames latent frames). Start it from an ODE-initialised student
(roles.student.path: a run's export).
"""

from dataclasses import dataclass
from typing import List

import torch

from distill.methods.base import Metrics
from distill.methods.dmd2 import DMD2, DMD2Config, Rollout, student_sigmas
from distill.registry import register_method
from distill.sampling import CausalSampler, Sampler, causal_rollout


@dataclass
class SelfForcingConfig(DMD2Config):
    name: str = "self_forcing"
    warp_steps: bool = True  # Self-Forcing warps its listed steps with the shift
    # true: each chunk draws its own exit step; false: one exit step for the whole
    # video (Self-Forcing's released default, same_step_across_blocks)
    exit_per_chunk: bool = True
    # the timestep (sigma*1000) the generated chunks are re-encoded at for the cache
    context_timestep: int = 0


@register_method
class SelfForcing(DMD2):
    config_class = SelfForcingConfig

    @classmethod
    def check(cls, cfg: SelfForcingConfig) -> List[str]:
        errors = super().check(cfg)
        if cfg.rollout != Rollout.simulate:
            errors.append(f"method.rollout={cfg.rollout.value}: self_forcing generates its own videos "
                          "(allowed: simulate)")
        if not 0 <= cfg.context_timestep < 1000:
            errors.append(f"method.context_timestep={cfg.context_timestep}: must be in [0, 1000)")
        return errors

    @classmethod
    def check_roles(cls, roles) -> List[str]:
        errors = super().check_roles(roles)
        student = roles.get("student")
        if student is not None and not student.causal:
            errors.append("roles.student.causal=false: self_forcing trains a block-causal student (set it to true)")
        return errors

    @classmethod
    def sampler(cls, cfg: SelfForcingConfig, adapter, role: str) -> Sampler:
        if role != "student":
            return super().sampler(cfg, adapter, role)
        return CausalSampler(student_sigmas(cfg, adapter).tolist(), adapter.cfg.chunk_frames,
                             cfg.context_timestep / 1000)

    def exit_steps(self, chunks: int) -> List[int]:
        """One exit step per chunk (or one for all), drawn alike on every rank."""
        if self.cfg.exit_per_chunk:
            return [self.exit_step() for _ in range(chunks)]
        return [self.exit_step()] * chunks

    def student_sample(self, batch, cond, metrics: Metrics) -> torch.Tensor:
        """The student's video, generated chunk by chunk as at inference."""
        text = batch["text_embeds"]
        noise = self.randn((text.shape[0], *self.adapter.latent_shape))
        chunks = -(-noise.shape[2] // self.adapter.cfg.chunk_frames)
        exits = self.exit_steps(chunks)
        sigmas = self.student_sigmas.to(self.device)
        metrics.update({"student_step": sum(exits) / chunks, "sigma/student": self.student_sigmas[exits].mean()})
        return causal_rollout(self.adapter, self.roles["student"], noise, sigmas, text, self.randn, exits,
                              self.cfg.context_timestep / 1000, **cond)
