"""ODE initialisation (CausVid, Self-Forcing): regress the student's x0
prediction from the teacher's ODE states onto the ODE's clean end.

The pairs come from `python -m distill.ode_pairs` with this same config: for
each prompt, the teacher's Euler + CFG trajectory from noise, stored at the
student's listed sigmas beside its clean end. Each sample draws one stored
state per chunk of model.chunk_frames latent frames (a block-causal student:
every chunk at its own noise level, as CausVid's per-block timesteps) or one
for the whole clip (a full-attention student), per sample, so that any number
of ranks draws alike. The loss is the mean squared error of the predicted x0
against the clean end. With `clean_step` a chunk may also draw the clean end
itself at sigma 0 (CausVid: one in four with three listed steps): the chunk
is masked out of the loss but stays in the input, context for the chunks
after it, as the KV cache holds clean chunks at inference.
"""

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set, Tuple

import torch

from distill.config.schema import MethodConfig
from distill.data import DataError
from distill.methods.base import Losses, Method, Metrics
from distill.methods.dmd2 import student_sigmas  # the same steps -> sigmas rule as DMD2's student
from distill.registry import register_method
from distill.sampling import CausalSampler, FewStepSampler, Sampler


@dataclass
class OdeInitConfig(MethodConfig):
    name: str = "ode_init"
    # the student's steps as sigma*1000, noisiest first, as in DMD2 / Self-Forcing;
    # the ODE pairs hold the teacher's states at exactly these sigmas
    student_steps: List[int] = field(default_factory=lambda: [1000, 750, 500, 250])
    warp_steps: bool = True  # pass the listed steps through the model's shift
    teacher_steps: int = 48  # Euler steps of the teacher's ODE (python -m distill.ode_pairs)
    guidance_scale: float = 6.0  # the teacher's CFG, uncond + w * (cond - uncond)
    teacher_path: Optional[str] = None  # the teacher of the ODE pairs; null: model.path
    lr: float = 2e-6  # the student's learning rate
    # true: a chunk may draw the clean end (sigma 0), kept as context, masked out of the loss (CausVid)
    clean_step: bool = False


@register_method
class OdeInit(Method):
    config_class = OdeInitConfig
    roles = {"student": True}

    @classmethod
    def check(cls, cfg: OdeInitConfig) -> List[str]:
        errors = []
        steps = list(cfg.student_steps)
        if not steps or any(not 0 < s <= 1000 for s in steps) or any(a <= b for a, b in zip(steps, steps[1:])):
            errors.append(f"method.student_steps={steps}: list steps in (0, 1000], strictly decreasing")
        if cfg.teacher_steps < len(steps):
            errors.append(f"method.teacher_steps={cfg.teacher_steps}: at least one Euler step per listed step "
                          f"({len(steps)})")
        if cfg.guidance_scale < 0:
            errors.append(f"method.guidance_scale={cfg.guidance_scale}: must be >= 0 (1 means no guidance)")
        if not cfg.lr > 0:
            errors.append(f"method.lr={cfg.lr}: must be > 0")
        return errors

    @classmethod
    def check_model(cls, cfg: OdeInitConfig, model) -> List[str]:
        if cfg.clean_step and not model.chunk_frames:
            return ["method.clean_step=true needs a block-causal student (model.chunk_frames): "
                    "a clean clip is all masked out of the loss"]
        return []

    @classmethod
    def batch_keys(cls, cfg: OdeInitConfig) -> Set[str]:
        return {"text_embeds", "ode_trajectory", "ode_sigmas"}

    @classmethod
    def lr_keys(cls, cfg: OdeInitConfig) -> Dict[str, str]:
        return {"student": "lr"}

    @classmethod
    def guidance_scale(cls, cfg: OdeInitConfig) -> float:
        return cfg.guidance_scale

    @classmethod
    def sampler(cls, cfg: OdeInitConfig, adapter, role: str) -> Sampler:
        sigmas = student_sigmas(cfg, adapter).tolist()
        if adapter.cfg.chunk_frames:  # the student is block-causal (the model family checks it)
            return CausalSampler(sigmas, adapter.cfg.chunk_frames)
        return FewStepSampler(sigmas)

    def __init__(self, cfg, adapter, roles, seed, device):
        super().__init__(cfg, adapter, roles, seed, device)
        self.sigmas = student_sigmas(cfg, adapter)
        self.causal = roles["student"].cfg.causal

    def roles_to_step(self, iteration: int) -> List[str]:
        return ["student"]

    def losses(self, batch, iteration) -> Tuple[Losses, Metrics]:
        states, stored = batch["ode_trajectory"], batch["ode_sigmas"][0].cpu()
        if stored.shape != self.sigmas.shape or not torch.allclose(stored, self.sigmas, atol=1e-5):
            raise DataError(f"the ODE pairs were made at sigmas {stored.tolist()}, the student lists "
                            f"{self.sigmas.tolist()} (method.student_steps, warp_steps, model.shift): "
                            "make them again with this config")
        n, _, c, frames, h, w = states.shape
        size = self.adapter.cfg.chunk_frames if self.causal else frames
        pick = self.randint(len(self.sigmas) + int(self.cfg.clean_step), (n, -(-frames // size))).to(states.device)
        per_frame = pick.repeat_interleave(size, dim=1)[:, :frames]  # [n, frames]; S: the clean end
        x_t = states.gather(1, per_frame[:, None, None, :, None, None].expand(n, 1, c, frames, h, w)).squeeze(1)
        sigma = torch.cat([self.sigmas, torch.zeros(1)]).to(states.device)[per_frame]
        if not self.causal:
            sigma = sigma[:, 0]  # one noise level for the whole clip
        x0 = self.adapter.predict_x0(self.roles["student"], x_t, sigma, batch["text_embeds"])
        noised = (per_frame < len(self.sigmas)).float()  # [n, frames]: the frames the loss counts
        loss = masked_mse(x0, states[:, -1].float(), noised)
        return {"student": loss}, {"sigma/student": sigma.mean(), "clean_fraction": 1 - noised.mean()}


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
    """The mean squared error over the latent frames where `frames` [B, T] is 1
    (0 when none is; the prediction keeps its graph)."""
    weight = frames[:, None, :, None, None].expand_as(prediction)
    return ((prediction.float() - target) ** 2 * weight).sum() / weight.sum().clamp(min=1)
