"""Sampling an evaluation's videos: one MP4 per item (prompt, index, seed),
written whole or not at all (a temporary name, then a rename), so that a rerun
skips exactly the videos already on disk."""

import logging
import os
from pathlib import Path
from typing import List, Optional

import torch

from distill.evaluation.prompts import Item
from distill.sample import encode_prompts, sample_latents
from distill.validation.media import save_clip

log = logging.getLogger(__name__)


def missing(items: List[Item], folder: Path) -> List[Item]:
    return [item for item in items if not (folder / item.file_name).is_file()]


@torch.no_grad()
def write_videos(target, items: List[Item], folder: Path, fps: float, negative: Optional[str] = None,
                 pad_to: int = 0) -> int:
    """Sample and write `items` into `folder`; returns how many were written.

    `pad_to`: run at least this many samplings, the extra ones unwritten (the
    ranks of a sharded role must call its forward equally often)."""
    folder.mkdir(parents=True, exist_ok=True)
    device = next(target.role.module.parameters()).device
    for k in range(max(len(items), pad_to)):
        item = items[k] if k < len(items) else None
        latents = _sample(target, item, negative, device)
        if item is None:
            continue  # a padding sampling
        pixels = target.adapter.decode(latents)[0].cpu()
        tmp = folder / f".{item.file_name}.{os.getpid()}.tmp.mp4"
        save_clip(pixels, tmp, fps=fps)
        os.replace(tmp, folder / item.file_name)
        log.info("%s (seed %d)", item.file_name, item.seed)
    return len(items)


def _sample(target, item: Optional[Item], negative: Optional[str], device) -> torch.Tensor:
    prompt = item.prompt if item else ""
    text, uncond = encode_prompts(target.adapter, [prompt], negative, device)
    return sample_latents(target.adapter, target.role, target.sampler, text, uncond, [item.seed if item else 0])
