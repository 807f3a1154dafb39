"""DMD2: distribution matching distillation with a learned fake score.

Per iteration: a student sample x0_G; every `generator_update_interval`
iterations the student descends the distribution-matching gradient
(fake score - real score); every iteration the critic (fake score) fits the
student's samples by flow matching. With `gan.enabled`, a head on the
critic (distill/methods/gan.py) also learns to tell real latents from x0_G,
and the student gets its non-saturating generator term.
"""

from dataclasses import dataclass, field
from enum import Enum
from typing import Dict, List, Set, Tuple

import torch
import torch.nn.functional as F

from distill.config.schema import MethodConfig
from distill.methods.base import Forward, MemoryPhase, TEXT_KEYS, Losses, Method, Metrics
from distill.methods.gan import (GanConfig, GanHead, approximate_r1, check_gan, discriminator_loss, generator_gan_loss,
                                 through_input_only)
from distill.methods.streams import stream_loss, stream_map
from distill.registry import register_method
from distill.sampling import CausalSampler, FewStepSampler, Sampler, rollout


class Rollout(str, Enum):
    simulate = "simulate"  # data-free backward simulation from pure noise
    data = "data"  # noise a real latent to a listed step


class StepDraw(str, Enum):
    """Who shares the listed step the student's input is noised to (rollout=data)."""

    shared = "shared"  # one for the whole batch, alike on every rank
    per_sample = "per_sample"  # each sample its own (FastGen's DMD2)
    per_chunk = "per_chunk"  # each chunk of each sample its own (CausVid; a block-causal student)


class StudentSampler(str, Enum):
    """How the student moves between its listed steps, sampling and in the rollout."""

    stochastic = "stochastic"  # re-noise x0 with fresh noise (DMD2, CausVid, Self-Forcing)
    deterministic = "deterministic"  # with the noise x0 implies: an Euler ODE step (FastGen's "ode")


class CriticSample(str, Enum):
    """What the critic fits on an iteration that also trains the student."""

    reuse = "reuse"  # the student's sample of this iteration, detached
    fresh = "fresh"  # a new rollout on the same batch (CausVid)
    fresh_batch = "fresh_batch"  # a new rollout on the next batch (Self-Forcing)


@dataclass
class DMD2Config(MethodConfig):
    name: str = "dmd2"
    # The student's steps as sigma*1000 before the shift, from noisiest down (fractions
    # allowed: LTX-2's distilled list has 993.75).
    student_steps: List[float] = field(default_factory=lambda: [1000, 757, 522])
    # true: pass the listed steps through the model's shift (the warped list), as
    # only the causal Self-Forcing pipelines do; FastVideo's DMD2 and FastWan use them raw
    warp_steps: bool = False
    rollout: Rollout = Rollout.simulate
    student_sampler: StudentSampler = StudentSampler.stochastic
    student_step_draw: StepDraw = StepDraw.shared
    # true: the per-chunk draw includes the clean end, sigma 0 (CausVid's step list
    # [1000, 757, 522, 0]): such a chunk is the data latent itself, context for the later ones
    clean_step: bool = False
    critic_sample: CriticSample = CriticSample.reuse
    # false: a generator iteration steps only the student, so the critic trains on
    # generator_update_interval - 1 of every generator_update_interval iterations (FastGen)
    critic_on_generator_iterations: bool = True
    # Teacher CFG as uncond + w * (cond - uncond). Recipes written as
    # cond + w' * (cond - uncond) use w = w' + 1.
    guidance_scale: float = 4.5
    generator_update_interval: int = 5
    min_timestep_ratio: float = 0.02
    max_timestep_ratio: float = 0.98
    generator_lr: float = 2e-6  # the student's learning rate
    critic_lr: float = 2e-6  # the critic's learning rate (its GAN head's too)
    gan: GanConfig = field(default_factory=GanConfig)  # DMD2's GAN term (off by default)


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


def check_student_steps(student_steps) -> List[str]:
    steps = [int(s) if s == int(s) else s for s in student_steps]  # as written: 757, not 757.0
    if not steps:
        return ["method.student_steps is empty: list at least one step in (0, 1000], noisiest first"]
    if any(not 0 < s <= 1000 for s in steps):
        return [f"method.student_steps={steps}: each step must be in (0, 1000]"]
    if any(a <= b for a, b in zip(steps, steps[1:])):
        return [f"method.student_steps={steps}: must be strictly decreasing (noisiest first)"]
    return []


def student_sigmas(cfg, adapter) -> torch.Tensor:
    """The student's listed steps (cfg.student_steps) as sigmas, passed through the
    shift when cfg.warp_steps (DMD2's, Self-Forcing's and ODE init's configs)."""
    sigmas = torch.tensor(list(cfg.student_steps), dtype=torch.float32) / 1000
    return adapter.shift_sigma(sigmas) if cfg.warp_steps else sigmas


@register_method
class DMD2(Method):
    config_class = DMD2Config
    roles = {"student": True, "teacher": False, "critic": True}

    @classmethod
    def check(cls, cfg: DMD2Config) -> List[str]:
        errors = check_student_steps(cfg.student_steps)
        lo, hi = cfg.min_timestep_ratio, cfg.max_timestep_ratio
        if not 0.0 <= lo < hi <= 1.0:
            errors.append(
                f"method.min_timestep_ratio={lo}, method.max_timestep_ratio={hi}: "
                "need 0 <= min_timestep_ratio < max_timestep_ratio <= 1"
            )
        if cfg.generator_update_interval < 1:
            errors.append(f"method.generator_update_interval={cfg.generator_update_interval}: must be >= 1")
        if cfg.guidance_scale < 0:
            errors.append(f"method.guidance_scale={cfg.guidance_scale}: must be >= 0 (1 means no guidance)")
        for key in ("generator_lr", "critic_lr"):
            if not getattr(cfg, key) > 0:
                errors.append(f"method.{key}={getattr(cfg, key)}: must be > 0")
        return errors + cls.check_sampling(cfg) + check_gan(cfg.gan)

    @classmethod
    def check_sampling(cls, cfg: DMD2Config) -> List[str]:
        errors = []
        draw = cfg.student_step_draw
        if draw != StepDraw.shared and cfg.rollout != Rollout.data:
            errors.append(f"method.student_step_draw={draw.value}: needs method.rollout=data (a simulated rollout "
                          "runs one step count for the batch; allowed: shared)")
        if cfg.clean_step and draw != StepDraw.per_chunk:
            errors.append(f"method.clean_step=true needs method.student_step_draw=per_chunk (got {draw.value}): "
                          "a clean clip gives the student no gradient; a clean chunk is context for the next")
        if cfg.critic_sample != CriticSample.reuse and not cfg.critic_on_generator_iterations:
            errors.append(f"method.critic_sample={cfg.critic_sample.value} with "
                          "method.critic_on_generator_iterations=false: the critic never trains beside the student "
                          "(allowed: reuse)")
        if not cfg.critic_on_generator_iterations and cfg.generator_update_interval == 1:
            errors.append("method.critic_on_generator_iterations=false with method.generator_update_interval=1: "
                          "the critic would never train")
        return errors

    @classmethod
    def check_model(cls, cfg: DMD2Config, model) -> List[str]:
        errors = []
        if cfg.student_step_draw == StepDraw.per_chunk and not model.chunk_frames:
            errors.append("method.student_step_draw=per_chunk needs a block-causal student (model.chunk_frames and "
                          "roles.student.causal=true)")
        if cfg.student_sampler == StudentSampler.deterministic and model.chunk_frames:
            errors.append("method.student_sampler=deterministic with model.chunk_frames: the chunk-by-chunk sampler "
                          "re-noises (allowed: stochastic)")
        return errors

    @classmethod
    def block_indices(cls, cfg: DMD2Config):
        return {"method.gan.blocks": (cfg.gan.features, list(cfg.gan.blocks))} if cfg.gan.enabled else {}

    @classmethod
    def batch_keys(cls, cfg: DMD2Config) -> Set[str]:
        """Real latents for the data rollout, and for the GAN's real side (with
        rollout=simulate they serve only the discriminator)."""
        needs_latents = cfg.rollout == Rollout.data or cfg.gan.enabled
        return set(TEXT_KEYS) | ({"latents"} if needs_latents else set())

    @classmethod
    def role_modules(cls, cfg: DMD2Config, adapter, role: str, network):
        if role != "critic" or not cfg.gan.enabled:
            return {}
        return {"gan_head": GanHead(adapter.hidden_size(network), len(cfg.gan.blocks), cfg.gan.head_hidden)}

    @classmethod
    def fingerprint(cls, cfg: DMD2Config):
        gan = cfg.gan
        return {"method.gan": [list(gan.blocks), gan.head_hidden] if gan.enabled else None}

    @classmethod
    def lr_keys(cls, cfg: DMD2Config) -> Dict[str, str]:
        return {"student": "generator_lr", "critic": "critic_lr"}

    @classmethod
    def memory_phases(cls, cfg: DMD2Config) -> List[MemoryPhase]:
        """A generator iteration holds the student's and the critic's graphs at once
        (both losses, one backward) beside the frozen scores; a critic iteration
        only the critic's, after the student's rollout without gradient."""
        gan = cfg.gan
        cfg_samples = 1 if cfg.guidance_scale == 1 else 2
        rollout = [Forward("student", 1, False)]  # in the order they run
        critic = [Forward("critic")]
        if gan.enabled:
            critic.append(Forward(gan.features, 1, gan.trunk_grad and gan.features == "critic"))  # real side
        scores = [Forward("critic", 1, False), Forward("teacher", cfg_samples, False)]
        gan_term = [Forward(gan.features)] if gan.enabled else []  # the generator's, through its input
        generator = rollout + [Forward("student")] + scores + gan_term
        if not cfg.critic_on_generator_iterations:
            return [MemoryPhase("generator", ["student"], generator), MemoryPhase("critic", ["critic"], rollout + critic)]
        if cfg.critic_sample != CriticSample.reuse:  # the critic's own rollout, without gradient
            critic = [Forward("student", 1, False)] + critic
        return [MemoryPhase("generator", ["student", "critic"], generator + critic),
                MemoryPhase("critic", ["critic"], rollout + critic)]

    @classmethod
    def guidance_scale(cls, cfg: DMD2Config) -> float:
        return cfg.guidance_scale

    @classmethod
    def check_roles(cls, roles) -> List[str]:
        """A block-causal student is allowed (CausVid); the scores see the whole video."""
        return [f"roles.{name}.causal=true: the real and fake scores see the whole video (allowed: false)"
                for name in ("teacher", "critic") if name in roles and roles[name].causal]

    @classmethod
    def sampler(cls, cfg: DMD2Config, adapter, role: str) -> Sampler:
        """The student samples in its listed steps; the critic, a flow-matching model
        of the student's outputs, by the unguided ODE."""
        if role == "student" and adapter.cfg.chunk_frames:  # a block-causal student: chunk by chunk
            return CausalSampler(student_sigmas(cfg, adapter).tolist(), adapter.cfg.chunk_frames)
        if role == "student":
            return FewStepSampler(student_sigmas(cfg, adapter).tolist(), cfg.student_sampler == StudentSampler.deterministic)
        return super().sampler(cfg, adapter, role)

    def __init__(self, cfg, adapter, roles, seed, device):
        super().__init__(cfg, adapter, roles, seed, device)
        self.student_sigmas = student_sigmas(cfg, adapter)

    def roles_to_step(self, iteration: int) -> List[str]:
        if not self.is_generator_iteration(iteration):
            return ["critic"]
        return ["student", "critic"] if self.cfg.critic_on_generator_iterations else ["student"]

    def is_generator_iteration(self, iteration: int) -> bool:
        return iteration % self.cfg.generator_update_interval == 0

    def trains_critic(self, iteration: int) -> bool:
        return not self.is_generator_iteration(iteration) or self.cfg.critic_on_generator_iterations

    def step_losses(self, batch, iteration, next_batch=None) -> Tuple[Losses, Metrics]:
        losses, metrics = super().step_losses(batch, iteration)
        if "student" in losses and self.trains_critic(iteration) and self.cfg.critic_sample == CriticSample.fresh_batch:
            critic_batch = next_batch()
            self.noise.start(critic_batch["sample_id"].tolist())
            losses["critic"] = self.fresh_critic_loss(critic_batch, metrics)
        return losses, metrics

    def losses(self, batch, iteration) -> Tuple[Losses, Metrics]:
        """The student's loss on a generator iteration, and the critic's on the same
        sample (critic_sample=reuse), a fresh one (fresh), or none here (fresh_batch:
        step_losses adds it from the next batch)."""
        metrics: Metrics = {}
        if not self.is_generator_iteration(iteration):
            return {"critic": self.fresh_critic_loss(batch, metrics)}, metrics
        text, uncond = batch["text_embeds"], batch["negative_text_embeds"]
        cond = self.adapter.conditioning(batch)
        x0 = self.student_sample(batch, cond, metrics)
        losses = {"student": self.generator_loss(x0, text, uncond, cond, metrics)}
        if not self.cfg.critic_on_generator_iterations:
            return losses, metrics
        if self.cfg.critic_sample == CriticSample.reuse:
            losses["critic"] = self.critic_loss(x0.detach(), text, cond, metrics, batch.get("latents"))
        elif self.cfg.critic_sample == CriticSample.fresh:
            losses["critic"] = self.fresh_critic_loss(batch, metrics)
        return losses, metrics

    def fresh_critic_loss(self, batch, metrics: Metrics) -> torch.Tensor:
        """The critic's loss on a new student sample of `batch`, drawn without gradient."""
        cond = self.adapter.conditioning(batch)
        with torch.no_grad():
            x0 = self.student_sample(batch, cond, metrics)
        return self.critic_loss(x0, batch["text_embeds"], cond, metrics, batch.get("latents"))

    def sample_sigma(self, n: int) -> torch.Tensor:
        """Uniform, shifted, clamped to [min_timestep_ratio, max_timestep_ratio]."""
        sigma = self.adapter.shift_sigma(self.rand(n))
        return sigma.clamp(self.cfg.min_timestep_ratio, self.cfg.max_timestep_ratio)

    def exit_step(self) -> int:
        """A random listed step, the same on every rank."""
        return int(torch.randint(len(self.student_sigmas), (1,), generator=self.shared_rng))

    def input_steps(self, n: int, frames: int) -> torch.Tensor:
        """Indices into the listed steps (and, with clean_step, one past them: sigma 0)
        for the student's data-rollout input: [n] (shared, per_sample) or [n, frames]
        (per_chunk, alike within a chunk). Per-sample draws follow the sample ids, so
        any number of ranks draws the same."""
        draw, choices = self.cfg.student_step_draw, len(self.student_sigmas) + int(self.cfg.clean_step)
        if draw == StepDraw.shared:
            return torch.full((n,), self.exit_step(), dtype=torch.long, device=self.device)
        if draw == StepDraw.per_sample:  # drawn where the noise is: nothing is read back to the host
            return self.randint(choices, (n,))
        size = self.adapter.cfg.chunk_frames
        per_chunk = self.randint(choices, (n, -(-frames // size)))
        return per_chunk.repeat_interleave(size, dim=1)[:, :frames]

    def student_sample(self, batch, cond, metrics: Metrics) -> torch.Tensor:
        """x0 from the student at a random listed step; grad flows only through that last step."""
        sigmas = self.student_sigmas.to(self.device)
        n = batch["text_embeds"].shape[0]
        student, text = self.roles["student"], batch["text_embeds"]
        if self.cfg.rollout.value == "data":
            latents = batch["latents"]
            steps = self.input_steps(n, self.adapter.cfg.latent_shape[1])  # the latent frames (chunks)
            sigma = torch.cat([sigmas, sigmas.new_zeros(1)])[steps]  # index len(sigmas): clean
            metrics.update({"student_step": steps.float().mean(), "sigma/student": sigma.mean()})
            x = self.adapter.add_noise(latents, self.randn(latents.shape), sigma)
            return self.adapter.predict_x0(student, x, sigma, text, **cond)
        step = self.exit_step()
        metrics.update({"student_step": step, "sigma/student": sigmas[step]})
        # backward simulation: run only the steps before the target
        x = self.randn((n, *self.adapter.latent_shape))
        with torch.no_grad():
            x = rollout(self.adapter, student, x, sigmas, text, self.randn, step,
                        self.cfg.student_sampler == StudentSampler.deterministic, **cond)
        return self.adapter.predict_x0(student, x, sigmas[step].expand(n), text, **cond)

    def generator_loss(self, x0: torch.Tensor, text, uncond, cond, metrics: Metrics) -> torch.Tensor:
        sigma = self.sample_sigma(x0.shape[0])
        noise = self.randn(x0.shape)
        with torch.no_grad():
            x_s = self.adapter.add_noise(x0.detach(), noise, sigma)
            fake = self.adapter.predict_x0(self.roles["critic"], x_s, sigma, text, **cond)
            real = self.adapter.predict_x0_cfg(
                self.roles["teacher"], x_s, sigma, text, uncond, self.cfg.guidance_scale, **cond
            )
            grad = stream_map(self.adapter, dmd_gradient, x0.detach().float(), fake, real)  # a normaliser per stream
        metrics["sigma/generator"] = sigma.mean()
        loss = stream_loss(self.adapter, generator_loss, x0, grad)
        if self.cfg.gan.enabled:
            gan = self.gan_generator_loss(self.adapter.add_noise(x0, noise, sigma), sigma, text, cond)
            metrics["gan/generator"] = gan.detach()
            loss = loss + self.cfg.gan.generator_weight * gan
        return loss

    def critic_loss(self, x0: torch.Tensor, text, cond, metrics: Metrics, real=None) -> torch.Tensor:
        sigma = self.sample_sigma(x0.shape[0])
        noise = self.randn(x0.shape)
        x_t = self.adapter.add_noise(x0, noise, sigma)
        critic = self.roles["critic"]
        gan = self.cfg.gan
        if gan.enabled and gan.features == "critic":
            v, fake_features = self.adapter.predict_with_features(critic, x_t, sigma, text, gan.blocks, **cond)
        else:
            v, fake_features = self.adapter.predict_velocity(critic, x_t, sigma, text, **cond), None
        metrics["sigma/critic"] = sigma.mean()
        loss = stream_loss(self.adapter, F.mse_loss, v, self.adapter.velocity_target(x0, noise).float())
        if gan.enabled:
            real_t = self.adapter.add_noise(real, noise, sigma)  # the same sigma and noise as the fake side
            loss = loss + self.gan_discriminator_loss(x_t, real_t, fake_features, sigma, text, cond, metrics)
        return loss

    # --- the GAN term ----------------------------------------------------------
    @property
    def head(self):
        return self.roles["critic"].module.gan_head

    def gan_features(self, x_t: torch.Tensor, sigma, text, cond) -> list:
        role = self.roles[self.cfg.gan.features]
        return self.adapter.predict_with_features(role, x_t, sigma, text, self.cfg.gan.blocks, **cond)[1]

    def gan_generator_loss(self, x_g: torch.Tensor, sigma, text, cond) -> torch.Tensor:
        """softplus(-D(x_g)); its gradient reaches the student through x_g only."""
        leaf = x_g.detach().requires_grad_(True)
        loss = generator_gan_loss(self.head(self.gan_features(leaf, sigma, text, cond)))
        return through_input_only(loss, leaf, x_g)

    def gan_discriminator_loss(self, fake_t, real_t, fake_features, sigma, text, cond, metrics: Metrics) -> torch.Tensor:
        """The head's loss on real and fake (both detached from the student); the
        trunk gets its gradient only with gan.trunk_grad (critic features)."""
        gan = self.cfg.gan
        with torch.set_grad_enabled(gan.trunk_grad):
            if fake_features is None:
                fake_features = self.gan_features(fake_t, sigma, text, cond)
            real_features = self.gan_features(real_t, sigma, text, cond)
        if not gan.trunk_grad:
            fake_features = [f.detach() for f in fake_features]
        real_logits, fake_logits = self.head(real_features), self.head(fake_features)
        d_loss = discriminator_loss(real_logits, fake_logits)
        metrics.update({"gan/discriminator": d_loss.detach(), "gan/real_logit": real_logits.detach().mean(),
                        "gan/fake_logit": fake_logits.detach().mean()})
        loss = gan.discriminator_weight * d_loss
        if gan.r1_weight > 0:
            with torch.no_grad():
                perturbed = self.gan_features(real_t + gan.r1_alpha * self.randn(real_t.shape), sigma, text, cond)
            r1 = approximate_r1(real_logits, self.head(perturbed))
            metrics["gan/r1"] = r1.detach()
            loss = loss + gan.r1_weight * r1
        return loss
