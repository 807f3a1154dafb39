"""sCM: continuous-time consistency distillation of the teacher into a few-step student.

Every iteration the student takes the sCM step on a data latent noised to a
time t of sCM's distribution (distill/methods/consistency.py): the teacher's
guided prediction gives the ODE's direction, one forward-mode JVP the frozen
student's derivative along it, and the student's own forward the gradient.
Roles: the student (trainable, its adaptive weight w(t) attached) and the
frozen teacher. It samples like a DMD2 student: x0 at each listed step,
re-noised with fresh noise to the next (rCM's sampler).
"""

from dataclasses import dataclass, field
from typing import Dict, List, Tuple

from distill.config.schema import MethodConfig
from distill.methods.base import Forward, Losses, MemoryPhase, Method, Metrics
from distill.methods.consistency import ConsistencyTerm, ConsistencyTerms, check_consistency
from distill.methods.dmd2 import check_student_steps, student_sigmas
from distill.registry import register_method
from distill.sampling import FewStepSampler, Sampler


@dataclass
class SCMConfig(ConsistencyTerms, MethodConfig):
    name: str = "scm"
    # the student's steps as sigma*1000, noisiest first (DMD2's key): rCM's 4-step TrigFlow
    # times atan(80), 1.5, 1.4, 1.0 (rcm/inference/wan2pt1_t2v_rcm_infer.py) as flow sigmas
    student_steps: List[float] = field(default_factory=lambda: [987.6543, 933.7811, 852.8954, 608.979])
    warp_steps: bool = False
    # teacher CFG as uncond + w * (cond - uncond)
    guidance_scale: float = 5.0
    lr: float = 2e-6  # the student's learning rate


@register_method
class SCM(ConsistencyTerm, Method):
    config_class = SCMConfig
    roles = {"student": True, "teacher": False}

    @classmethod
    def check(cls, cfg: SCMConfig) -> List[str]:
        errors = check_student_steps(cfg.student_steps) + check_consistency(cfg)
        if cfg.guidance_scale < 0:
            errors.append(f"method.guidance_scale={cfg.guidance_scale}: must be >= 0 (1 means no guidance)")
        if not cfg.lr > 0:
            errors.append(f"method.lr={cfg.lr}: must be > 0")
        return errors

    @classmethod
    def check_roles(cls, roles) -> List[str]:
        errors = super().check_roles(roles)  # the student's
        if "teacher" in roles and roles["teacher"].causal:
            errors.append("roles.teacher.causal=true: scm trains a full-attention student (allowed: false)")
        return errors

    @classmethod
    def lr_keys(cls, cfg) -> Dict[str, str]:
        return {"student": "lr"}

    @classmethod
    def guidance_scale(cls, cfg) -> float:
        return cfg.guidance_scale

    @classmethod
    def memory_phases(cls, cfg) -> List[MemoryPhase]:
        return [MemoryPhase("student", ["student"], consistency_forwards(cfg))]

    @classmethod
    def sampler(cls, cfg, adapter, role: str) -> Sampler:
        if role == "student":
            return FewStepSampler(student_sigmas(cfg, adapter).tolist())
        return super().sampler(cfg, adapter, role)

    def roles_to_step(self, iteration: int) -> List[str]:
        return ["student"]

    def losses(self, batch, iteration) -> Tuple[Losses, Metrics]:
        metrics: Metrics = {}
        loss = self.consistency_loss(batch["latents"], batch["text_embeds"], batch["negative_text_embeds"],
                                     self.adapter.conditioning(batch), iteration, metrics)
        return {"student": loss}, metrics


def consistency_forwards(cfg) -> List[Forward]:
    """The sCM term's forwards in order: the guided teacher, the student's JVP (no
    gradient; a tangent beside every activation), the student with gradient."""
    cfg_samples = 1 if cfg.guidance_scale == 1 else 2
    return [Forward("teacher", cfg_samples, False), Forward("student", 1, False, tangent=True), Forward("student")]
