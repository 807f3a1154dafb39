"""A method and a model family from outside the package, registered the way a
lab would add its own (DISTILL_PLUGINS=distill_extras, with
hydra.searchpath pointing at the conf/ beside this file).

- method `teacher_regression`: the student's x0 at a listed sigma regresses
  onto the guided teacher's x0 at the same noisy input; roles student
  (trainable) and teacher (frozen); samples in its listed steps.
- family `wan_first_frame`: a Wan transformer conditioned on the clean first
  latent frame, concatenated on channels over every frame (as Wan's
  image-to-video models take the image latent): an extra forward input the
  family takes from the batch.
"""

from dataclasses import dataclass, field
from typing import Dict, List

import torch
import torch.nn.functional as F

from distill.config.schema import MethodConfig
from distill.methods.base import TEXT_KEYS, Method
from distill.models.wan import WanAdapter
from distill.registry import register_family, register_method
from distill.sampling import FewStepSampler


@dataclass
class TeacherRegressionConfig(MethodConfig):
    name: str = "teacher_regression"
    student_steps: List[int] = field(default_factory=lambda: [1000, 500])
    guidance_scale: float = 2.0
    lr: float = 1e-4


@register_method
class TeacherRegression(Method):
    config_class = TeacherRegressionConfig
    roles = {"student": True, "teacher": False}

    @classmethod
    def check(cls, cfg) -> List[str]:
        return [] if cfg.student_steps else ["method.student_steps is empty"]

    @classmethod
    def lr_keys(cls, cfg) -> Dict[str, str]:
        return {"student": "lr"}

    @classmethod
    def guidance_scale(cls, cfg) -> float:
        return cfg.guidance_scale

    @classmethod
    def sampler(cls, cfg, adapter, role):
        return FewStepSampler([s / 1000 for s in cfg.student_steps])

    def roles_to_step(self, iteration: int) -> List[str]:
        return ["student"]

    def losses(self, batch, iteration):
        text, uncond = batch["text_embeds"], batch["negative_text_embeds"]
        cond = self.adapter.conditioning(batch)
        n = text.shape[0]
        sigmas = torch.tensor(self.cfg.student_steps, dtype=torch.float32, device=self.device) / 1000
        sigma = sigmas[int(torch.randint(len(sigmas), (1,), generator=self.shared_rng))].expand(n)
        x_t = self.randn((n, *self.adapter.latent_shape))
        if float(sigma[0]) < 1:
            x_t = self.adapter.add_noise(batch["latents"], x_t, sigma)
        with torch.no_grad():
            target = self.adapter.predict_x0_cfg(self.roles["teacher"], x_t, sigma, text, uncond,
                                                 self.cfg.guidance_scale, **cond)
        x0 = self.adapter.predict_x0(self.roles["student"], x_t, sigma, text, **cond)
        return {"student": F.mse_loss(x0, target)}, {"sigma/student": float(sigma.mean())}

    @classmethod
    def batch_keys(cls, cfg):
        return set(TEXT_KEYS) | {"latents"}


@register_family
class WanFirstFrameAdapter(WanAdapter):
    family = "wan_first_frame"

    @classmethod
    def in_channels(cls, model) -> int:
        return 2 * model.latent_shape[0]

    def conditioning(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return {"first_frame": batch["latents"][:, :, :1]}

    def forward(self, module, x_t, timestep, text, first_frame=None):
        if first_frame is None:
            raise ValueError("wan_first_frame needs the first_frame input")
        frames = first_frame.to(x_t.dtype).expand(-1, -1, x_t.shape[2], -1, -1)
        return super().forward(module, torch.cat([x_t, frames], dim=1), timestep, text)
