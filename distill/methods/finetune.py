"""Flow-matching training of one role, with condition dropout for CFG."""

from dataclasses import dataclass
from typing import Dict, List, Set, Tuple

import torch
import torch.nn.functional as F

from distill.config.schema import MethodConfig
from distill.methods.base import TEXT_KEYS, Losses, Method, Metrics
from distill.methods.streams import stream_loss
from distill.registry import register_method


@dataclass
class FinetuneConfig(MethodConfig):
    name: str = "finetune"
    lr: float = 1e-5  # the student's learning rate
    # probability of training on the empty prompt, so that CFG works later
    condition_dropout: float = 0.1
    # the CFG scale the trained role samples with in validation and export
    guidance_scale: float = 1.0


@register_method
class Finetune(Method):
    config_class = FinetuneConfig
    roles = {"student": True}

    @classmethod
    def check(cls, cfg: FinetuneConfig) -> List[str]:
        errors = []
        if not 0.0 <= cfg.condition_dropout <= 1.0:
            errors.append(f"method.condition_dropout={cfg.condition_dropout}: must be in [0, 1]")
        if not cfg.lr > 0:
            errors.append(f"method.lr={cfg.lr}: must be > 0")
        if cfg.guidance_scale < 0:
            errors.append(f"method.guidance_scale={cfg.guidance_scale}: must be >= 0 (1 means no guidance)")
        return errors

    @classmethod
    def batch_keys(cls, cfg: FinetuneConfig) -> Set[str]:
        return set(TEXT_KEYS) | {"latents"}

    @classmethod
    def lr_keys(cls, cfg: FinetuneConfig) -> Dict[str, str]:
        return {"student": "lr"}

    @classmethod
    def guidance_scale(cls, cfg: FinetuneConfig) -> float:
        return cfg.guidance_scale

    def roles_to_step(self, iteration: int) -> List[str]:
        return ["student"]

    def losses(self, batch, iteration) -> Tuple[Losses, Metrics]:
        x0 = batch["latents"]
        n = x0.shape[0]
        sigma = self.adapter.shift_sigma(self.rand(n))
        noise = self.randn(x0.shape)
        drop = (self.rand(n) < self.cfg.condition_dropout).reshape(-1, 1, 1)
        text = torch.where(drop, batch["negative_text_embeds"], batch["text_embeds"])
        x_t = self.adapter.add_noise(x0, noise, sigma)
        v = self.adapter.predict_velocity(self.roles["student"], x_t, sigma, text, **self.adapter.conditioning(batch))
        loss = stream_loss(self.adapter, F.mse_loss, v, self.adapter.velocity_target(x0, noise).float())
        return {"student": loss}, {"sigma/student": sigma.mean()}
