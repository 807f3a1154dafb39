"""The metrics an evaluation computes, each enabled by the path of its network
and refused in one line, before any sampling, when that path is missing:

  clip_score  clip_model                  text-video CLIP score (distill/evaluation/clip_score.py)
  fvd         i3d_model, fvd_reference    Frechet video distance (distill/evaluation/fvd.py)
  vbench      vbench_cache                VBench's dimensions (distill/evaluation/vbench_dimensions.py)
  digits      (the demo's classifier)     conditional accuracy and Frechet distance of digit clips

Each metric is called with the evaluation's videos, read back from their MP4s
as [(item, pixels [3, T, H, W])], and the evaluation folder."""

from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from distill.config.schema import EvaluateConfig
from distill.evaluation.prompts import Item

NEEDS = {"clip_score": ["clip_model"], "fvd": ["i3d_model", "fvd_reference"], "vbench": ["vbench_cache"],
         "digits": []}


class MetricSetupError(ValueError):
    pass


def key(name: str) -> str:
    """A setting as both spellings a user may have given it."""
    return f"--{name.replace('_', '-')} / validation.evaluate.{name}"


def chosen(cfg: EvaluateConfig) -> List[str]:
    """The listed metrics, or (none listed) every metric whose paths are all given."""
    if cfg.metrics:
        return list(cfg.metrics)
    return [m for m, paths in NEEDS.items() if paths and all(getattr(cfg, p) for p in paths)]


def problems(cfg: EvaluateConfig, prompts: Optional[List[str]] = None) -> List[str]:
    """Everything that stops the chosen metrics, one line each (cheap: no network is loaded)."""
    from distill.evaluation import vbench_dimensions

    found, metrics = [], chosen(cfg)
    for metric in metrics:
        if metric not in NEEDS:
            found.append(f"metric {metric}: unknown; one of {', '.join(NEEDS)}")
            continue
        for name in NEEDS[metric]:
            value = getattr(cfg, name)
            if not value:
                found.append(f"metric {metric} needs {name}: give {key(name)}")
            elif not Path(value).exists():
                found.append(f"{name}={value}: no such file or folder ({key(name)})")
    if "fvd" in metrics and cfg.fvd_reference and Path(cfg.fvd_reference).is_dir():
        from distill.evaluation.fvd import reference_videos

        if len(reference_videos(Path(cfg.fvd_reference))) < 2:
            found.append(f"fvd_reference={cfg.fvd_reference}: fewer than 2 videos ({key('fvd_reference')})")
    if "vbench" in metrics and cfg.vbench_cache:
        found += vbench_dimensions.check(cfg.vbench_cache, cfg.vbench_dimensions, Path(cfg.prompts or ""))
    if "digits" in metrics:
        for number, prompt in enumerate(prompts or [], 1):
            if digit_label(prompt) is None:
                found.append(f"metric digits: prompt {number} ({prompt!r}) is not 'the digit D moving ...'")
                break
    return found


def build(cfg: EvaluateConfig, prompts: List[str], device: torch.device) -> list:
    """The chosen metrics, loaded; MetricSetupError (one line each) when one cannot run."""
    found = problems(cfg, prompts)
    if found:
        raise MetricSetupError("\n".join(found))
    built = []
    for metric in chosen(cfg):
        if metric == "clip_score":
            from distill.evaluation.clip_score import ClipScore

            built.append(ClipScore(cfg.clip_model, device))
        elif metric == "fvd":
            from distill.evaluation.fvd import FVD

            built.append(FVD(cfg.i3d_model, cfg.fvd_reference, device))
        elif metric == "vbench":
            from distill.evaluation.vbench_dimensions import VBenchDimensions

            built.append(VBenchDimensions(cfg.vbench_cache, cfg.vbench_dimensions, Path(cfg.prompts), device))
        else:
            built.append(DigitScores())
    return built


def digit_label(prompt: str) -> Optional[int]:
    words = prompt.split()
    if len(words) >= 3 and words[:2] == ["the", "digit"] and words[2].isdigit():
        return int(words[2])
    return None


class DigitScores:
    """The demo's metrics (distill/validation/digit_metrics.py) on the videos, gray again."""

    name = "digits"

    def __init__(self):
        from distill.validation.digit_metrics import DigitMetrics

        self.metric = DigitMetrics()

    def __call__(self, videos: List[Tuple[Item, torch.Tensor]], folder: Path) -> Dict[str, float]:
        clips = torch.stack([pixels.mean(dim=0, keepdim=True) for _, pixels in videos])
        labels = torch.tensor([digit_label(item.prompt) for item, _ in videos])
        return {f"digits/{k}": v for k, v in self.metric(clips, labels).items()}
