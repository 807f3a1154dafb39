"""rCM: score-regularised continuous-time consistency (Zheng et al. 2025).

The student's loss is sCM's consistency term (distill/methods/consistency.py)
plus DMD2's reverse-divergence term as a regulariser: this class is DMD2 (its
critic, teacher CFG, update interval, timestep clamps and GAN option, the
same code) whose generator iterations add the sCM term on a data latent.
For the first `tangent_warmup` iterations only the sCM term trains the student
and the critic waits; after them, as in DMD2, the student steps every
`generator_update_interval`-th iteration and the critic on the others.

The defaults are the rCM release's Wan2.1 T2V 1.3B recipe
(rcm/configs/experiments/rcm/wan2pt1_t2v.py and rcm/models/t2v_model_distill_rcm.py,
github.com/NVlabs/rcm at 5b41aa92c493d0627df8651996a04196e9de186f), converted:
- its losses are sums over latent elements, 100 x sCM's and 1 x DMD's
  sum (x0 - sg(x0 - grad))^2; here the sCM term is a mean over elements and
  DMD2's generator loss half the mean square, so the same ratio is
  consistency_weight 100 and dmd_weight 2 (no gradient clipping, as there);
- its DMD time draw p_D, uniform shifted by 5 on the flow sigma and unclamped, is
  DMD2's draw with model.shift 5 and the clamps at 0 and 1.
Where it differs, deliberately: the student's rollout for the DMD term runs the
listed steps (DMD2's backward simulation; the release draws the rollout's
times from p_D), and the critic fits velocity (the release's x0 error / sin t,
a weight within a factor 2 of it).
"""

from dataclasses import dataclass, field
from typing import List, Tuple

from distill.methods.base import Losses, MemoryPhase, Metrics
from distill.methods.consistency import ConsistencyTerm, ConsistencyTerms, WarmupForm, check_consistency
from distill.methods.dmd2 import DMD2, DMD2Config
from distill.methods.scm import consistency_forwards
from distill.registry import register_method


@dataclass
class RCMConfig(ConsistencyTerms, DMD2Config):
    name: str = "rcm"
    # rCM's 4-step TrigFlow times atan(80), 1.5, 1.4, 1.0 as flow sigmas x 1000
    # (rcm/inference/wan2pt1_t2v_rcm_infer.py: mid_t; 1 and 2 steps take the first 1 and 2)
    student_steps: List[float] = field(default_factory=lambda: [987.6543, 933.7811, 852.8954, 608.979])
    guidance_scale: float = 5.0  # teacher_guidance, in uncond + w (cond - uncond) form there too
    generator_update_interval: int = 5  # student_update_freq
    critic_on_generator_iterations: bool = False  # a student iteration steps only the student there
    min_timestep_ratio: float = 0.0
    max_timestep_ratio: float = 1.0
    generator_lr: float = 2e-6
    critic_lr: float = 4e-7
    time_mean: float = 0.7  # p_G = LogNormal(0.7, 1.6) over tan t
    time_std: float = 1.6
    tangent_warmup: int = 1000
    warmup_form: WarmupForm = WarmupForm.rcm
    adaptive_weighting: bool = False  # the release weighs by loss_scale alone
    consistency_weight: float = 100.0
    dmd_weight: float = 2.0  # DMD2's generator loss (with its GAN term, where on) in the student's loss


@register_method
class RCM(ConsistencyTerm, DMD2):
    config_class = RCMConfig

    @classmethod
    def check(cls, cfg: RCMConfig) -> List[str]:
        errors = super().check(cfg) + check_consistency(cfg)
        if cfg.dmd_weight < 0:
            errors.append(f"method.dmd_weight={cfg.dmd_weight}: must be >= 0 (0: sCM with a critic that trains)")
        return errors

    @classmethod
    def memory_phases(cls, cfg) -> List[MemoryPhase]:
        """DMD2's phases, the generator's preceded by the sCM term's forwards."""
        phases = super().memory_phases(cfg)
        for phase in phases:
            if phase.name == "generator":
                phase.forwards = consistency_forwards(cfg) + phase.forwards
        return phases

    def in_warmup(self, iteration: int) -> bool:
        return iteration < self.cfg.tangent_warmup

    def is_generator_iteration(self, iteration: int) -> bool:
        if self.in_warmup(iteration):
            return True
        return (iteration - self.cfg.tangent_warmup) % self.cfg.generator_update_interval == 0

    def roles_to_step(self, iteration: int) -> List[str]:
        return ["student"] if self.in_warmup(iteration) else super().roles_to_step(iteration)

    def losses(self, batch, iteration) -> Tuple[Losses, Metrics]:
        if not self.is_generator_iteration(iteration):
            return super().losses(batch, iteration)  # the critic's
        metrics: Metrics = {}
        consistency = self.consistency_loss(batch["latents"], batch["text_embeds"], batch["negative_text_embeds"],
                                            self.adapter.conditioning(batch), iteration, metrics)
        if self.in_warmup(iteration):
            return {"student": consistency}, metrics
        losses, dmd_metrics = super().losses(batch, iteration)
        metrics.update(dmd_metrics)
        metrics["loss/consistency"] = consistency.detach()
        metrics["loss/dmd"] = losses["student"].detach()
        losses["student"] = consistency + self.cfg.dmd_weight * losses["student"]
        return losses, metrics
