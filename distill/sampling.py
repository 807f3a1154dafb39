"""Sampling: the few-step sampler DMD2 students use (predict x0, re-noise
to the next listed sigma with fresh noise) and the Euler flow-matching ODE
sampler with classifier-free guidance that teachers use.

A method says which one a trained role uses (`Method.sampler`); validation,
export and `python -m distill.sample` call it without knowing the method.
Extra conditioning inputs of a model family (`cond`) pass through unchanged.
"""

from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence

import torch


def rollout(adapter, role, x: torch.Tensor, sigmas: Sequence, text: torch.Tensor, randn: Callable, steps: int,
            **cond):
    """Run `steps` student steps from x at sigmas[0]; returns x at sigmas[steps]."""
    n = x.shape[0]
    for k in range(steps):
        x0 = adapter.predict_x0(role, x, sigmas[k].expand(n), text, **cond)
        x = adapter.add_noise(x0, randn(x0.shape), sigmas[k + 1].expand(n))
    return x


@torch.no_grad()
def sample(adapter, role, sigmas: torch.Tensor, text: torch.Tensor, randn: Callable, **cond) -> torch.Tensor:
    """x0 after all listed steps, starting from pure noise."""
    x = randn((text.shape[0], *adapter.latent_shape))
    x = rollout(adapter, role, x, sigmas, text, randn, len(sigmas) - 1, **cond)
    return adapter.predict_x0(role, x, sigmas[-1].expand(x.shape[0]), text, **cond)


@torch.no_grad()
def euler_sample(adapter, role, sigmas: torch.Tensor, text, uncond, scale: float, noise: torch.Tensor,
                 **cond) -> torch.Tensor:
    """Integrate dx/dsigma = v from sigmas[0] down to 0 with guided velocities
    v = v_uncond + scale * (v_cond - v_uncond)."""
    x = noise
    n = x.shape[0]
    doubled = {k: torch.cat([v, v]) for k, v in cond.items()}
    steps = torch.cat([sigmas.to(x.device), torch.zeros(1, device=x.device)])
    for k in range(len(sigmas)):
        sigma = steps[k].expand(n)
        v = adapter.predict_velocity(role, torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([text, uncond]),
                                     **doubled)
        cond_v, unc = v.chunk(2)
        x = x + (steps[k + 1] - steps[k]) * (unc + scale * (cond_v - unc))
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
        kinds = {"few_step": FewStepSampler, "euler": EulerSampler}
        kind = dict(info)
        return kinds[kind.pop("kind")](**kind)


@dataclass
class FewStepSampler(Sampler):
    """The student's listed sigmas: x0 at each, re-noised to the next."""

    sigmas: List[float]

    def __call__(self, adapter, role, text, uncond, randn, **cond):
        return sample(adapter, role, torch.tensor(self.sigmas, device=text.device), text, randn, **cond)

    def to_json(self) -> Dict:
        return {"kind": "few_step", "sigmas": list(self.sigmas)}


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
