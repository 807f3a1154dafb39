"""Continuous-time consistency (sCM: Lu & Song 2024) on a flow-matching model.

TrigFlow writes a noisy sample as x_t = cos(t) x0 + sin(t) z, t in [0, pi/2]
(sigma_data = 1), and a network's prediction as F(x_t, t), with the
consistency function f = cos(t) x_t - sin(t) F = the predicted x0. A
flow-matching model (x_s = (1 - s) x0 + s z, velocity v = z - x0) is the same
model in other coordinates:

    s = sin t / (sin t + cos t),   x_s = x_t / (sin t + cos t),
    F = (cos t x_t - x0_pred) / sin t,   x0_pred = x_s - s v(x_s, s)

so the teacher and the student stay the family's networks, called through the
adapter at sigma s; only the loss is written in TrigFlow.

The loss (sCM's continuous-time distillation, with its stabilisers):
- time: tan t = exp(tau), tau ~ N(time_mean, time_std^2);
- the teacher's guided F_T gives dx_t/dt = F_T; the tangent of the frozen student
  (theta-, no gradient) along it, T = cos t sin t dF-/dt, comes from one
  forward-mode JVP with tangents (cos t sin t F_T, cos t sin t) (distill/jvp.py);
- g = -cos^2 t (F- - F_T) - r cos t sin t (x_t + dF-/dt), r rising 0 -> 1 over
  `tangent_warmup` iterations (warmup_form=rcm: the rCM release's variant,
  -cos t sqrt(1 - r^2 sin^2 t) (F- - F_T) - (r cos t sin t x_t + T));
- tangent normalisation: g <- g / (||g|| + c), per sample;
- loss = mean over samples of e^w(t) / D ||F - F- - g||^2 - w(t), with w a learned
  function of t (adaptive weighting, `AdaptiveWeight`), or ||F - F- - g||^2 / D.
Its gradient is that of sCM's objective E[w sin t F^T df-/dt]; its value at the
step is ||g||^2 / D, the size of the update.
"""

import math
from dataclasses import dataclass
from enum import Enum
from typing import Dict, List, Set

import torch
from torch import nn

from distill.jvp import jvp
from distill.methods.base import Metrics


class WarmupForm(str, Enum):
    scm = "scm"  # r scales cos t sin t (x_t + dF/dt) (sCM paper)
    rcm = "rcm"  # r scales cos t sin t x_t, and the first term's cos^2 t reads cos t sqrt(1 - r^2 sin^2 t) (rCM release)


@dataclass
class ConsistencyTerms:
    """The sCM term's keys (method.*), shared by method=scm and method=rcm."""

    # log tan t ~ N(time_mean, time_std^2): sCM's distillation distribution (sigma_data = 1)
    time_mean: float = -0.8
    time_std: float = 1.6
    # iterations over which the tangent warmup r rises linearly from 0 to 1 (0: r = 1 from the start)
    tangent_warmup: int = 10000
    warmup_form: WarmupForm = WarmupForm.scm
    # c of the tangent normalisation g / (||g|| + c); sCM and rCM use 0.1
    tangent_norm: float = 0.1
    # learn w(t) and weigh each sample's loss by e^w / D, plus -w (sCM); false: 1 / D
    adaptive_weighting: bool = True
    # the sCM term's weight in the student's loss
    consistency_weight: float = 1.0


def check_consistency(cfg: ConsistencyTerms) -> List[str]:
    errors = []
    if not cfg.time_std > 0:
        errors.append(f"method.time_std={cfg.time_std}: must be > 0")
    if cfg.tangent_warmup < 0:
        errors.append(f"method.tangent_warmup={cfg.tangent_warmup}: must be >= 0 (0: no warmup)")
    if cfg.tangent_norm < 0:
        errors.append(f"method.tangent_norm={cfg.tangent_norm}: must be >= 0")
    if not cfg.consistency_weight > 0:
        errors.append(f"method.consistency_weight={cfg.consistency_weight}: must be > 0")
    return errors


def jvp_model_errors(model) -> List[str]:
    """What forward-mode AD through the network cannot go through yet: the model section."""
    if model.attention_backend not in (None, "native"):
        return [f"model.attention_backend={model.attention_backend}: the sCM tangent needs attention through SDPA, "
                "whose tangent distill/jvp.py writes out (allowed: null, native)"]
    return []


def jvp_parallel_errors(parallel) -> List[str]:
    if parallel.context > 1:
        return [f"parallel.context={parallel.context}: the sCM tangent does not pass through the context "
                "all-to-all (allowed: 1)"]
    return []


# --- TrigFlow <-> flow matching ---------------------------------------------------
def flow_sigma(t: torch.Tensor) -> torch.Tensor:
    """The flow-matching sigma of TrigFlow time t."""
    return torch.sin(t) / (torch.sin(t) + torch.cos(t))


def trig_time(sigma: torch.Tensor) -> torch.Tensor:
    """TrigFlow time of a flow-matching sigma."""
    return torch.atan2(sigma, 1 - sigma)


def trig_prediction(x0_pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """F = (cos t x_t - x0_pred) / sin t (t per sample)."""
    cos, sin = _per_sample(torch.cos(t), x_t), _per_sample(torch.sin(t), x_t)
    return (cos * x_t - x0_pred) / sin


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


# --- the loss -------------------------------------------------------------------------
def tangent_target(frozen: torch.Tensor, teacher: torch.Tensor, tangent: torch.Tensor, x_t: torch.Tensor,
                   t: torch.Tensor, r: float, form: WarmupForm) -> torch.Tensor:
    """g of the module docstring; `tangent` is cos t sin t dF-/dt."""
    cos, sin = _per_sample(torch.cos(t), x_t), _per_sample(torch.sin(t), x_t)
    if form == WarmupForm.rcm:
        return -cos * torch.sqrt(1 - r ** 2 * sin ** 2) * (frozen - teacher) - (r * cos * sin * x_t + tangent)
    return -cos ** 2 * (frozen - teacher) - r * (cos * sin * x_t + tangent)


def normalised(g: torch.Tensor, c: float) -> torch.Tensor:
    """g / (||g|| + c), the norm over each sample."""
    norm = g.flatten(1).norm(dim=1)
    return g / _per_sample(norm + c, g)


def consistency_loss(prediction: torch.Tensor, frozen: torch.Tensor, g: torch.Tensor,
                     log_weight: torch.Tensor = None) -> torch.Tensor:
    """mean_i e^w_i / D ||F_i - F-_i - g_i||^2 - w_i (w = 0 without adaptive weighting)."""
    per_sample = (prediction - frozen - g).pow(2).flatten(1).mean(dim=1)
    if log_weight is None:
        return per_sample.mean()
    return (torch.exp(log_weight) * per_sample - log_weight).mean()


class AdaptiveWeight(nn.Module):
    """w(t): one linear layer over sinusoidal features of the flow timestep 1000 s,
    zero at the start (every sample weighed 1)."""

    def __init__(self, features: int = 64):
        super().__init__()
        self.features = features
        self.linear = nn.Linear(features, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.features // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
        angles = 1000 * flow_sigma(t)[:, None] * freqs[None].to(t.dtype)
        features = torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)
        return self.linear(features.to(self.linear.weight.dtype)).squeeze(1)


class ConsistencyTerm:
    """The sCM term of a method whose config has ConsistencyTerms' keys and a
    `guidance_scale`, and whose roles include the student and the teacher (mixed
    into a Method, before it: uses its adapter, roles and per-sample random draws,
    and adds to its entry what the term needs, through super())."""

    @classmethod
    def check_model(cls, cfg, model) -> List[str]:
        return super().check_model(cfg, model) + jvp_model_errors(model)

    @classmethod
    def check_parallel(cls, cfg, parallel) -> List[str]:
        return super().check_parallel(cfg, parallel) + jvp_parallel_errors(parallel)

    @classmethod
    def check_roles(cls, roles) -> List[str]:
        errors = super().check_roles(roles)
        if "student" in roles and roles["student"].causal:
            errors.append(f"roles.student.causal=true: {cls.config_class.name} trains a full-attention student "
                          "(allowed: false)")
        return errors

    @classmethod
    def batch_keys(cls, cfg) -> Set[str]:
        return super().batch_keys(cfg) | {"latents"}  # the data the consistency term noises

    @classmethod
    def role_modules(cls, cfg, adapter, role: str, network) -> Dict[str, nn.Module]:
        modules = super().role_modules(cfg, adapter, role, network)
        if role == "student" and cfg.adaptive_weighting:
            modules["adaptive_weight"] = AdaptiveWeight()
        return modules

    @classmethod
    def fingerprint(cls, cfg) -> Dict[str, object]:
        return {**super().fingerprint(cfg), "method.adaptive_weighting": cfg.adaptive_weighting}

    def warmup_ratio(self, iteration: int) -> float:
        warmup = self.cfg.tangent_warmup
        return 1.0 if warmup == 0 else min(1.0, iteration / warmup)

    def draw_trig_time(self, n: int) -> torch.Tensor:
        tau = self.cfg.time_mean + self.cfg.time_std * self.randn((n,))
        return torch.atan(torch.exp(tau))

    def student_prediction(self, x_t: torch.Tensor, t: torch.Tensor, text, cond) -> torch.Tensor:
        """The student's F(x_t, t), through the family's network at sigma s(t)."""
        scale = _per_sample(torch.sin(t) + torch.cos(t), x_t)
        x0 = self.adapter.predict_x0(self.roles["student"], x_t / scale, flow_sigma(t), text, **cond)
        return trig_prediction(x0, x_t, t)

    def consistency_loss(self, x0: torch.Tensor, text, uncond, cond, iteration: int, metrics: Metrics) -> torch.Tensor:
        cfg = self.cfg
        n = x0.shape[0]
        t = self.draw_trig_time(n)
        sigma = flow_sigma(t)
        x_s = self.adapter.add_noise(x0, self.randn(x0.shape), sigma)
        x_t = x_s * _per_sample(torch.sin(t) + torch.cos(t), x_s)
        with torch.no_grad():
            guided = self.adapter.predict_x0_cfg(self.roles["teacher"], x_s, sigma, text, uncond, cfg.guidance_scale,
                                                 **cond)
            teacher = trig_prediction(guided, x_t, t)
        speed = torch.cos(t) * torch.sin(t)
        frozen, tangent = jvp(lambda x, time: self.student_prediction(x, time, text, cond),
                              (x_t, t), (_per_sample(speed, x_t) * teacher, speed))
        r = self.warmup_ratio(iteration)
        raw = tangent_target(frozen, teacher, tangent, x_t, t, r, cfg.warmup_form)
        g = normalised(raw, cfg.tangent_norm)
        prediction = self.student_prediction(x_t, t, text, cond)
        log_weight = self.roles["student"].module.adaptive_weight(t) if cfg.adaptive_weighting else None
        metrics.update({"sigma/consistency": sigma.mean(), "consistency/tangent_warmup": r,
                        "consistency/g_norm": raw.flatten(1).norm(dim=1).mean()})
        if log_weight is not None:
            metrics["consistency/log_weight"] = log_weight.detach().mean()
        return cfg.consistency_weight * consistency_loss(prediction, frozen, g, log_weight)
