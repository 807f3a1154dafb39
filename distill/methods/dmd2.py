"""DMD2: distribution matching distillation with a learned fake score.

Per iteration: a student sample x0_G; every `generator_update_interval`
iterations the student descends the distribution-matching gradient
(fake score - real score); every iteration the critic (fake score) fits the
student's samples by flow matching.
"""

from typing import List, Tuple

import torch
import torch.nn.functional as F

from distill.methods.base import Losses, Method, Metrics
from distill.sampling import rollout


def dmd_gradient(x0: torch.Tensor, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """(fake - real) / mean|x0 - real|, the normaliser per sample (DMD eq. 8)."""
    dims = tuple(range(1, x0.dim()))
    normaliser = (x0 - real).abs().mean(dim=dims, keepdim=True)
    return torch.nan_to_num((fake - real) / normaliser)


def generator_loss(x0: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """0.5 * mse(x0, stopgrad(x0 - grad)) in fp32: d loss / d x0 = grad / x0.numel()."""
    x0 = x0.float()
    target = (x0 - grad.float()).detach()
    return 0.5 * F.mse_loss(x0, target)


class DMD2(Method):
    def __init__(self, cfg, adapter, roles, seed, device):
        super().__init__(cfg, adapter, roles, seed, device)
        sigmas = torch.tensor(list(cfg.student_steps), dtype=torch.float32) / 1000
        self.student_sigmas = adapter.shift_sigma(sigmas) if cfg.warp_steps else sigmas

    def roles_to_step(self, iteration: int) -> List[str]:
        return ["student", "critic"] if self.is_generator_iteration(iteration) else ["critic"]

    def is_generator_iteration(self, iteration: int) -> bool:
        return iteration % self.cfg.generator_update_interval == 0

    def losses(self, batch, iteration) -> Tuple[Losses, Metrics]:
        text, uncond = batch["text_embeds"], batch["negative_text_embeds"]
        train_student = self.is_generator_iteration(iteration)
        with torch.set_grad_enabled(train_student):
            x0, step = self.student_sample(batch)
        metrics = {"student_step": step, "sigma/student": float(self.student_sigmas[step])}
        losses = {}
        if train_student:
            losses["student"], metrics["sigma/generator"] = self.generator_loss(x0, text, uncond)
        # the same sample serves the critic: no second rollout
        losses["critic"], metrics["sigma/critic"] = self.critic_loss(x0.detach(), text)
        return losses, metrics

    def sample_sigma(self, n: int) -> torch.Tensor:
        """Uniform, shifted, clamped to [min_timestep_ratio, max_timestep_ratio]."""
        sigma = self.adapter.shift_sigma(self.rand(n))
        return sigma.clamp(self.cfg.min_timestep_ratio, self.cfg.max_timestep_ratio)

    def student_sample(self, batch) -> Tuple[torch.Tensor, int]:
        """x0 from the student at a random listed step; grad flows only through that last step."""
        sigmas = self.student_sigmas.to(self.device)
        step = int(torch.randint(len(sigmas), (1,), generator=self.shared_rng))
        n = batch["text_embeds"].shape[0]
        student, text = self.roles["student"], batch["text_embeds"]
        if self.cfg.rollout.value == "data":
            latents = batch["latents"]
            x = self.adapter.add_noise(latents, self.randn(latents.shape), sigmas[step].expand(n))
        else:
            # backward simulation: run only the steps before the target
            x = self.randn((n, *self.adapter.latent_shape))
            with torch.no_grad():
                x = rollout(self.adapter, student, x, sigmas, text, self.randn, step)
        return self.adapter.predict_x0(student, x, sigmas[step].expand(n), text), step

    def generator_loss(self, x0: torch.Tensor, text, uncond) -> Tuple[torch.Tensor, float]:
        sigma = self.sample_sigma(x0.shape[0])
        with torch.no_grad():
            x_s = self.adapter.add_noise(x0.detach(), self.randn(x0.shape), sigma)
            fake = self.adapter.predict_x0(self.roles["critic"], x_s, sigma, text)
            real = self.adapter.predict_x0_cfg(self.roles["teacher"], x_s, sigma, text, uncond, self.cfg.guidance_scale)
            grad = dmd_gradient(x0.detach().float(), fake, real)
        return generator_loss(x0, grad), float(sigma.mean())

    def critic_loss(self, x0: torch.Tensor, text) -> Tuple[torch.Tensor, float]:
        sigma = self.sample_sigma(x0.shape[0])
        noise = self.randn(x0.shape)
        v = self.adapter.predict_velocity(self.roles["critic"], self.adapter.add_noise(x0, noise, sigma), sigma, text)
        return F.mse_loss(v, self.adapter.velocity_target(x0, noise).float()), float(sigma.mean())
