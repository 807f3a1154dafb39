"""Sampling: the few-step sampler DMD2 students use (predict x0, re-noise
to the next listed sigma with fresh noise, or, deterministic, with the noise
the prediction implies: an Euler step of the flow ODE, FastGen's "ode"
student sampler) and the Euler flow-matching ODE sampler with
classifier-free guidance that teachers use.

A method says which one a trained role uses (`Method.sampler`); validation,
export and `python -m distill.sample` call it without knowing the method.
Extra conditioning inputs of a model family (`cond`) pass through unchanged.
"""

from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence

import torch


def rollout(adapter, role, x: torch.Tensor, sigmas: Sequence, text: torch.Tensor, randn: Callable, steps: int,
            deterministic: bool = False, **cond):
    """Run `steps` student steps from x at sigmas[0]; returns x at sigmas[steps]."""
    n = x.shape[0]
    for k in range(steps):
        sigma = sigmas[k].expand(n)
        x0 = adapter.predict_x0(role, x, sigma, text, **cond)
        noise = adapter.implied_noise(x, x0, sigma) if deterministic else randn(x0.shape)
        x = adapter.add_noise(x0, noise, sigmas[k + 1].expand(n))
    return x


@torch.no_grad()
def sample(adapter, role, sigmas: torch.Tensor, text: torch.Tensor, randn: Callable, deterministic: bool = False,
           **cond) -> torch.Tensor:
    """x0 after all listed steps, starting from pure noise."""
    x = randn((text.shape[0], *adapter.latent_shape))
    x = rollout(adapter, role, x, sigmas, text, randn, len(sigmas) - 1, deterministic, **cond)
    return adapter.predict_x0(role, x, sigmas[-1].expand(x.shape[0]), text, **cond)


def causal_rollout(adapter, role, noise: torch.Tensor, sigmas: torch.Tensor, text: torch.Tensor, randn: Callable,
                   exits: Sequence[int], context_sigma: float = 0.0, **cond) -> torch.Tensor:
    """A block-causal role's video, chunk by chunk over its KV cache (Self-Forcing).

    Chunk k starts from its slice of `noise` and runs the listed sigmas as the
    few-step sampler does, stopping at step exits[k]: its x0 there is the
    chunk. Only that forward keeps a gradient (when gradients are on). The
    chunk, re-noised to `context_sigma` (0: clean), is then run once more
    without gradient to write its keys and values for the chunks after it."""
    n, frames, size = noise.shape[0], noise.shape[2], adapter.cfg.chunk_frames
    grad = torch.is_grad_enabled()
    chunks = []
    with adapter.generation_cache(role) as cache:
        for k, start in enumerate(range(0, frames, size)):
            cache.frame_offset, cache.write = start, False
            x = noise[:, :, start:start + size]
            for step in range(exits[k] + 1):
                with torch.set_grad_enabled(grad and step == exits[k]):
                    x0 = adapter.predict_x0(role, x, sigmas[step].expand(n), text, **cond)
                if step < exits[k]:
                    x = adapter.add_noise(x0, randn(x0.shape), sigmas[step + 1].expand(n))
            chunks.append(x0)
            if start + size < frames:
                cache.write = True
                with torch.no_grad():
                    context = x0.detach()
                    if context_sigma > 0:
                        context = adapter.add_noise(context, randn(context.shape), context.new_full((n,), context_sigma))
                    adapter.predict_x0(role, context, context.new_full((n,), context_sigma), text, **cond)
    return torch.cat(chunks, dim=2)


@torch.no_grad()
def euler_sample(adapter, role, sigmas: torch.Tensor, text, uncond, scale: float, noise: torch.Tensor,
                 **cond) -> torch.Tensor:
    """Integrate dx/dsigma = v from sigmas[0] down to 0 with guided velocities
    v = v_uncond + scale * (v_cond - v_uncond)."""
    grid = torch.cat([sigmas.to(noise.device), torch.zeros(1, device=noise.device)])
    return guided_euler(adapter, role, noise, grid, text, uncond, scale, **cond)


@torch.no_grad()
def guided_euler(adapter, role, x: torch.Tensor, grid: torch.Tensor, text, uncond, scale: float,
                 **cond) -> torch.Tensor:
    """Euler steps of the guided flow ODE from grid[0] to grid[-1]."""
    n = x.shape[0]
    doubled = {k: torch.cat([v, v]) for k, v in cond.items()}
    for k in range(len(grid) - 1):
        sigma = grid[k].expand(n)
        v = adapter.predict_velocity(role, torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([text, uncond]),
                                     **doubled)
        cond_v, unc = v.chunk(2)
        x = x + (grid[k + 1] - grid[k]) * (unc + scale * (cond_v - unc))
    return x


class Sampler:
    """How a trained role turns noise into x0; `to_json` goes into exports."""

    sigmas: List[float]

    @property
    def num_steps(self) -> int:
        return len(self.sigmas)

    def __call__(self, adapter, role, text, uncond, randn: Callable, **cond) -> torch.Tensor:
        raise NotImplementedError

    def to_json(self) -> Dict:
        raise NotImplementedError

    @staticmethod
    def from_json(info: Dict) -> "Sampler":
        kinds = {"few_step": FewStepSampler, "euler": EulerSampler, "causal_few_step": CausalSampler}
        kind = dict(info)
        return kinds[kind.pop("kind")](**kind)


@dataclass
class FewStepSampler(Sampler):
    """The student's listed sigmas: x0 at each, re-noised to the next (deterministic:
    with the noise x0 implies, which is an Euler step of the flow ODE)."""

    sigmas: List[float]
    deterministic: bool = False

    def __call__(self, adapter, role, text, uncond, randn, **cond):
        return sample(adapter, role, torch.tensor(self.sigmas, device=text.device), text, randn, self.deterministic,
                      **cond)

    def to_json(self) -> Dict:
        info = {"kind": "few_step", "sigmas": list(self.sigmas)}
        return {**info, "deterministic": True} if self.deterministic else info


@dataclass
class EulerSampler(Sampler):
    """The flow-matching ODE by Euler steps, with classifier-free guidance."""

    sigmas: List[float]
    guidance_scale: float = 1.0

    def __call__(self, adapter, role, text, uncond, randn, **cond):
        noise = randn((text.shape[0], *adapter.latent_shape))
        sigmas = torch.tensor(self.sigmas, device=text.device)
        return euler_sample(adapter, role, sigmas, text, uncond, self.guidance_scale, noise, **cond)

    def to_json(self) -> Dict:
        return {"kind": "euler", "sigmas": list(self.sigmas), "guidance_scale": self.guidance_scale}


@dataclass
class CausalSampler(Sampler):
    """A block-causal student: the few-step sampler chunk by chunk over the KV cache,
    every chunk to the last listed sigma, the cache written from clean chunks."""

    sigmas: List[float]
    chunk_frames: int
    context_sigma: float = 0.0

    @torch.no_grad()
    def __call__(self, adapter, role, text, uncond, randn, **cond):
        noise = randn((text.shape[0], *adapter.latent_shape))
        chunks = -(-noise.shape[2] // self.chunk_frames)
        sigmas = torch.tensor(self.sigmas, device=text.device)
        return causal_rollout(adapter, role, noise, sigmas, text, randn, [len(self.sigmas) - 1] * chunks,
                              self.context_sigma, **cond)

    def to_json(self) -> Dict:
        return {"kind": "causal_few_step", "sigmas": list(self.sigmas), "chunk_frames": self.chunk_frames,
                "context_sigma": self.context_sigma}
