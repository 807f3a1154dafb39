"""Few-step sampling as DMD2 students use it: predict x0, re-noise to the
next listed sigma with fresh noise, repeat."""

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
