"""Sampling: the few-step sampler DMD2 students use (predict x0, re-noise
to the next listed sigma with fresh noise) and the Euler flow-matching ODE
sampler with classifier-free guidance that teachers use."""

from typing import Callable, Sequence

import torch


def rollout(adapter, role, x: torch.Tensor, sigmas: Sequence, text: torch.Tensor, randn: Callable, steps: int):
    """Run `steps` student steps from x at sigmas[0]; returns x at sigmas[steps]."""
    n = x.shape[0]
    for k in range(steps):
        x0 = adapter.predict_x0(role, x, sigmas[k].expand(n), text)
        x = adapter.add_noise(x0, randn(x0.shape), sigmas[k + 1].expand(n))
    return x


@torch.no_grad()
def sample(adapter, role, sigmas: torch.Tensor, text: torch.Tensor, randn: Callable) -> torch.Tensor:
    """x0 after all listed steps, starting from pure noise."""
    x = randn((text.shape[0], *adapter.latent_shape))
    x = rollout(adapter, role, x, sigmas, text, randn, len(sigmas) - 1)
    return adapter.predict_x0(role, x, sigmas[-1].expand(x.shape[0]), text)


@torch.no_grad()
def euler_sample(adapter, role, sigmas: torch.Tensor, text, uncond, scale: float, noise: torch.Tensor) -> torch.Tensor:
    """Integrate dx/dsigma = v from sigmas[0] down to 0 with guided velocities
    v = v_uncond + scale * (v_cond - v_uncond)."""
    x = noise
    n = x.shape[0]
    steps = torch.cat([sigmas.to(x.device), torch.zeros(1, device=x.device)])
    for k in range(len(sigmas)):
        sigma = steps[k].expand(n)
        v = adapter.predict_velocity(role, torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([text, uncond]))
        cond, unc = v.chunk(2)
        x = x + (steps[k + 1] - steps[k]) * (unc + scale * (cond - unc))
    return x
