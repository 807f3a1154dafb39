"""One evaluation of one target into one folder:

  <out>/evaluation.json  what is evaluated (target, role, step, sampler, prompts, seeds): a rerun
                         into the folder must match it, so videos of two setups never mix
  <out>/videos/          {prompt}-{index}.mp4, this rank's share written, the others' skipped
  <out>/metrics.json     once every video is on disk: the metrics with the commit, the
                         training config's hash, the seeds and the sampler
"""

import hashlib
import json
import logging
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import List, Optional

import torch

from distill.config.schema import EvaluateConfig
from distill.evaluation import metrics as metric_registry
from distill.evaluation.generate import missing, write_videos
from distill.evaluation.prompts import items, shard
from distill.slurm import git_state
from distill.validation.media import read_clip

log = logging.getLogger(__name__)


class EvaluationMismatch(ValueError):
    pass


def spec(target, cfg: EvaluateConfig, prompts: List[str]) -> dict:
    text = "\n".join(prompts).encode()
    return {**target.describe(), "prompts": cfg.prompts, "prompts_sha256": hashlib.sha256(text).hexdigest(),
            "num_prompts": len(dict.fromkeys(prompts)), "samples_per_prompt": cfg.samples,
            "seeds": [cfg.seed + i for i in range(cfg.samples)], "negative_prompt": cfg.negative_prompt}


def claim_folder(out: Path, wanted: dict) -> None:
    """Record what `out` evaluates, or check that it is what it already holds."""
    record = out / "evaluation.json"
    if record.is_file():
        held = json.loads(record.read_text())
        for name in ("target", "role", "step", "sampler", "prompts_sha256", "samples_per_prompt", "seeds",
                     "negative_prompt"):
            if held.get(name) != wanted.get(name):
                raise EvaluationMismatch(f"{out} holds an evaluation with another {name} ({held.get(name)!r}, "
                                         f"now {wanted.get(name)!r}): choose another --out")
        return
    out.mkdir(parents=True, exist_ok=True)
    write_json(record, wanted)


def write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value, indent=1) + "\n")
    os.replace(tmp, path)


def sample_share(target, cfg: EvaluateConfig, prompts: List[str], out: Path, rank: int = 0, world: int = 1,
                 pad_to_share: bool = False) -> int:
    """Write this rank's missing videos; with `pad_to_share` every rank samples its full share's
    count (a sharded role's forward is collective). Returns how many it wrote."""
    videos, every = out / "videos", items(prompts, cfg.samples, cfg.seed)
    pad = -(-len(every) // world) if pad_to_share else 0
    return write_videos(target, missing(shard(every, rank, world), videos), videos, cfg.fps, cfg.negative_prompt,
                        pad_to=pad)


def score(target, cfg: EvaluateConfig, prompts: List[str], out: Path, device: torch.device,
          metrics: Optional[list] = None) -> Optional[dict]:
    """metrics.json, when every video is on disk (None when some are still missing). `metrics`:
    the built metrics of an evaluator that scores many times (default: built here)."""
    every = items(prompts, cfg.samples, cfg.seed)
    if missing(every, out / "videos"):
        return None
    videos = [(item, read_clip(out / "videos" / item.file_name)) for item in every]
    values = {}
    for metric in metric_registry.build(cfg, prompts, device) if metrics is None else metrics:
        values.update(metric(videos, out))
        log.info("%s: %s", metric.name, {k: round(v, 4) for k, v in values.items()})
    result = {**spec(target, cfg, prompts), "dirty": None, **git_state(), "videos": len(every), "fps": cfg.fps,
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "metrics": values}
    write_json(out / "metrics.json", result)
    return result
