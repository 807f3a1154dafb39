"""What an evaluation samples: a TARGET folder turned into (adapter, role, sampler).

  an export           <run>/export/student (distill.json): the exported role with its sampler
  a checkpoint folder <run>/checkpoint-N: a trained role (`--role`, default student) with its
                      method's sampler, read from the checkpoint without exporting it
  a run folder        its newest complete checkpoint, as above

`--role teacher` on a checkpoint or run is the frozen teacher at its own Euler
steps with CFG (default: validation.teacher_steps and the validation guidance),
so student and teacher are judged on the same prompts and seeds.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from distill.checkpoint import Checkpointer, read_complete
from distill.config.io import load_config
from distill.model_card import config_hash
from distill.registry import family_class, method_class
from distill.roles import Role, weights_path
from distill.sampling import EulerSampler, Sampler


class TargetError(ValueError):
    pass


@dataclass
class Target:
    adapter: object
    role: Role
    sampler: Sampler
    path: Path
    kind: str  # export | checkpoint
    role_name: str
    step: Optional[int]
    config_sha256: str

    def describe(self) -> dict:
        return {"target": str(self.path), "kind": self.kind, "role": self.role_name, "step": self.step,
                "config_sha256": self.config_sha256, "sampler": self.sampler.to_json()}


def resolve(path: Path, role: str = "student", steps: Optional[int] = None, guidance: Optional[float] = None,
            ema: bool = False) -> Target:
    path = Path(path)
    if (path / "distill.json").is_file():
        return _export(path, steps)
    checkpoint = read_complete(path)
    if checkpoint is None:
        raise TargetError(f"{path}: neither an export (no distill.json) nor a run or checkpoint folder with a "
                          "complete checkpoint")
    return from_checkpoint(checkpoint, role, steps, guidance, ema)


def _export(folder: Path, steps: Optional[int]) -> Target:
    from distill.sample import load_exported, with_steps

    info = json.loads((folder / "distill.json").read_text())
    adapter, role, sampler = load_exported(folder)  # a LoRA role's export holds its merged network too
    step = info.get("checkpoint", "").rpartition("-")[2]
    return Target(adapter, role, with_steps(sampler, adapter, steps), folder, "export", info.get("role", "student"),
                  int(step) if step.isdigit() else None, info.get("config_sha256", "unknown"))


def from_checkpoint(checkpoint: Path, role: str, steps: Optional[int] = None, guidance: Optional[float] = None,
                    ema: bool = False) -> Target:
    from distill.export import trained_module
    from distill.models import build_adapter
    from distill.sample import with_steps

    config = load_config(checkpoint / "config.yaml")
    if role not in config.roles:
        raise TargetError(f"--role {role}: the run has the roles {', '.join(config.roles)}")
    if family_class(config.model.family).batch_condition(config.model) != "none":
        raise TargetError(f"{checkpoint}: an image-to-video run; evaluation samples from prompts only")
    adapter = build_adapter(config.model)
    cfg = config.roles[role]
    if cfg.trainable:
        module = trained_module(checkpoint, config, adapter, role, ema)
        module = adapter.make_causal(module) if cfg.causal else module
        sampler = with_steps(method_class(config.method.name).sampler(config.method, adapter, role), adapter, steps)
    else:  # a frozen role (the teacher): the flow ODE by Euler with CFG, as validation samples it
        module = adapter.load(weights_path(config, role), config.seed).eval().requires_grad_(False)
        scale = guidance or config.validation.guidance_scale or method_class(config.method.name).guidance_scale(
            config.method)
        sampler = EulerSampler(adapter.euler_sigmas(steps or config.validation.teacher_steps), scale)
    return Target(adapter, Role(role, cfg, module), sampler, checkpoint, "checkpoint", role,
                  Checkpointer.step_of(checkpoint), config_hash(checkpoint.parent))


def device_for(local_rank: int) -> torch.device:
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
