"""Run health: cheap statistics of sampled clips, and the student's against the
teacher's, to catch the failures that otherwise show only after a run (a
student that goes static, flat-coloured, or the same for every seed).

On pixels in [-1, 1], mapped to [0, 1]:
  motion       mean |frame t+1 - frame t| of each clip, averaged over clips
  flat_share   the share of frames of one colour: in every channel, the standard deviation
               over the frame's pixels under FLAT_STD (a solid blue frame is flat too)
  saturation   HSV saturation (max - min) / max over RGB, averaged (3-channel clips only)
  diversity    mean pairwise mean |a - b| over clips of one prompt at different seeds

A finding names what the student looks like against the teacher's reference
samples (validation.health): static (motion under motion_floor x the teacher's),
flat (flat_share over the teacher's + flat_margin), collapsed (diversity under
diversity_floor x the teacher's).
"""

from itertools import combinations
from typing import Dict, List, Optional

import torch

from distill.config.schema import HealthConfig

FLAT_STD = 0.02  # a frame whose pixels vary less than this (on [0, 1]) is one colour


def check_health_config(cfg: HealthConfig, key: str = "validation.health") -> List[str]:
    errors = [f"{key}.{name}={getattr(cfg, name)}: must be in [0, 1]"
              for name in ("motion_floor", "flat_margin", "diversity_floor") if not 0 <= getattr(cfg, name) <= 1]
    if cfg.diversity_seeds < 0 or cfg.diversity_seeds == 1:
        errors.append(f"{key}.diversity_seeds={cfg.diversity_seeds}: 0 (off) or at least 2")
    return errors


def clip_statistics(pixels: torch.Tensor, seeds_of_one_prompt: Optional[torch.Tensor] = None) -> Dict[str, float]:
    """The statistics of clips [N, C, T, H, W] (and of one prompt's clips at several seeds)."""
    p = (pixels.float().clamp(-1, 1) + 1) / 2
    spread = p.transpose(1, 2).flatten(3).std(dim=3)  # [N, T, C]: over each channel's pixels
    stats = {"flat_share": (spread.amax(dim=2) < FLAT_STD).float().mean().item()}
    if p.shape[2] > 1:
        stats["motion"] = (p[:, :, 1:] - p[:, :, :-1]).abs().mean().item()
    if p.shape[1] == 3:
        high, low = p.amax(dim=1), p.amin(dim=1)
        stats["saturation"] = ((high - low) / high.clamp(min=1e-6)).mean().item()
    if seeds_of_one_prompt is not None and len(seeds_of_one_prompt) > 1:
        q = (seeds_of_one_prompt.float().clamp(-1, 1) + 1) / 2
        pairs = [(q[i] - q[j]).abs().mean().item() for i, j in combinations(range(len(q)), 2)]
        stats["diversity"] = sum(pairs) / len(pairs)
    return stats


def findings(student: Dict[str, float], teacher: Dict[str, float], cfg: HealthConfig) -> List[str]:
    """What the student looks like against the teacher, one line each (empty: healthy)."""
    found = []
    if "motion" in student and teacher.get("motion", 0) > 0 and student["motion"] < cfg.motion_floor * teacher["motion"]:
        found.append(f"static: motion {student['motion']:.4g} against the teacher's {teacher['motion']:.4g} "
                     f"(validation.health.motion_floor={cfg.motion_floor})")
    if student["flat_share"] > teacher["flat_share"] + cfg.flat_margin:
        found.append(f"flat: {student['flat_share']:.0%} of frames one colour against the teacher's "
                     f"{teacher['flat_share']:.0%} (validation.health.flat_margin={cfg.flat_margin})")
    if "diversity" in student and teacher.get("diversity", 0) > 0 and (
            student["diversity"] < cfg.diversity_floor * teacher["diversity"]):
        found.append(f"collapsed: diversity over seeds {student['diversity']:.4g} against the teacher's "
                     f"{teacher['diversity']:.4g} (validation.health.diversity_floor={cfg.diversity_floor})")
    return found
