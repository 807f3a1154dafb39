"""Flow-matching training of one role, with condition dropout for CFG."""

from typing import List, Tuple

import torch
import torch.nn.functional as F

from distill.methods.base import Losses, Method, Metrics


class Finetune(Method):
    def roles_to_step(self, iteration: int) -> List[str]:
        return ["student"]

    def losses(self, batch, iteration) -> Tuple[Losses, Metrics]:
        x0 = batch["latents"]
        n = x0.shape[0]
        sigma = self.adapter.shift_sigma(self.rand(n))
        noise = self.randn(x0.shape)
        drop = (self.rand(n) < self.cfg.condition_dropout).reshape(-1, 1, 1)
        text = torch.where(drop, batch["negative_text_embeds"], batch["text_embeds"])
        v = self.adapter.predict_velocity(self.roles["student"], self.adapter.add_noise(x0, noise, sigma), sigma, text)
        loss = F.mse_loss(v, self.adapter.velocity_target(x0, noise).float())
        return {"student": loss}, {"sigma/student": float(sigma.mean())}
