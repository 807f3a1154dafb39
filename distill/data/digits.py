"""Moving digits: the demo dataset, built from scikit-learn's handwritten digits.

Each clip shows one 8x8 digit (scikit-learn's `load_digits`) on a 16x16 black
canvas, moving left, right, up or down over 4 frames; its prompt names both:
"the digit 7 moving left". The digit moves 2 pixels per frame, or (data.speeds)
at a speed drawn per clip from a list, which the prompt does not name: given
the first frame, the rest then has more than one answer. Pixels in [-1, 1] are the
latent (an identity VAE), [1, 4, 16, 16]; prompts are embedded by the
HashTextEncoder. Digit images are split 80/20 into the train and val splits,
so validation digits are handwriting the model never saw. With `frames=1`
(data.frames) each sample is a still image instead, [1, 1, 16, 16]: the digit at
a random place, its prompt "the digit 7" (experiment=digits_image).

The dataset is deterministic in its seed and written once, through the
parquet writer, to a cache folder named after its parameters. Several
processes may ask for it at once (the ranks of two runs, test workers): one
builds it under a lock on the cache folder while the others wait, and it
appears complete or not at all (built beside its place, then renamed).
"""

import contextlib
import fcntl
import logging
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from distill.data.schema import make_row
from distill.data.writer import write_dataset
from distill.data.hash_text import HashTextEncoder

log = logging.getLogger("distill")

FRAMES, SIZE, DIGIT, SPEED = 4, 16, 8, 2
MAX_SPEED = (SIZE - DIGIT) // (FRAMES - 1)  # faster, and no path stays on the canvas
DIRECTIONS = {"right": (0, 1), "left": (0, -1), "down": (1, 0), "up": (-1, 0)}
TEXT_LEN, TEXT_DIM = 8, 32
CLIPS = {"train": 8192, "val": 512}
VERSION = 1


def default_cache() -> Path:
    return Path.home() / ".cache" / "distill"


@contextlib.contextmanager
def cache_lock(folder: Path):
    """Held by one process at a time for `folder` (an flock on folder/.lock): whoever
    builds something in the cache holds it, so the others wait instead of building too."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def digit_images(split: str):
    """(images [N, 8, 8] in [0, 1], labels [N]) of one split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16.0
    labels = torch.tensor(digits.target)
    cut = int(0.8 * len(labels))
    return (images[:cut], labels[:cut]) if split == "train" else (images[cut:], labels[cut:])


def render_clip(image: torch.Tensor, direction: str, start, speed: int = SPEED) -> torch.Tensor:
    """[1, FRAMES, SIZE, SIZE] in [-1, 1]: the digit moving from `start`, `speed` pixels per frame."""
    clip = torch.zeros(1, FRAMES, SIZE, SIZE)
    dy, dx = DIRECTIONS[direction]
    for t in range(FRAMES):
        y, x = start[0] + dy * speed * t, start[1] + dx * speed * t
        clip[0, t, y : y + DIGIT, x : x + DIGIT] = image
    return clip * 2 - 1


def prompt(label: int, direction: str) -> str:
    return f"the digit {label} moving {direction}"


def make_stills(split: str, count: int, seed: int) -> List[Dict[str, object]]:
    """Still images [1, 1, SIZE, SIZE]: one digit at a random place, prompted by its label."""
    images, labels = digit_images(split)
    g = torch.Generator().manual_seed(seed + (0 if split == "train" else 1))
    encoder = HashTextEncoder(TEXT_DIM, TEXT_LEN)
    rows = []
    for i in range(count):
        k = int(torch.randint(len(labels), (1,), generator=g))
        y, x = (int(v) for v in torch.randint(0, SIZE - DIGIT + 1, (2,), generator=g))
        image = torch.zeros(1, 1, SIZE, SIZE)
        image[0, 0, y : y + DIGIT, x : x + DIGIT] = images[k]
        text = f"the digit {int(labels[k])}"
        rows.append(make_row(f"{split}-{i:05d}", encoder(text), text, image * 2 - 1, file_name=f"digits/{split}/{i:05d}",
                             width=SIZE, height=SIZE, num_frames=1, fps=8.0, duration_sec=0.0, media_type="image"))
    return rows


def make_clips(split: str, count: int, seed: int, speeds: Sequence[int] = (SPEED,)) -> List[Dict[str, object]]:
    images, labels = digit_images(split)
    g = torch.Generator().manual_seed(seed + (0 if split == "train" else 1))
    encoder = HashTextEncoder(TEXT_DIM, TEXT_LEN)
    rows = []
    for i in range(count):
        # one speed draws nothing, so the default set is the same as before speeds existed
        speed = speeds[int(torch.randint(len(speeds), (1,), generator=g))] if len(speeds) > 1 else speeds[0]
        travel = speed * (FRAMES - 1)
        k = int(torch.randint(len(labels), (1,), generator=g))
        direction = list(DIRECTIONS)[int(torch.randint(len(DIRECTIONS), (1,), generator=g))]
        dy, dx = DIRECTIONS[direction]
        # a start from which the whole path stays on the canvas
        lo_y, hi_y = max(0, -dy * travel), SIZE - DIGIT - max(0, dy * travel)
        lo_x, hi_x = max(0, -dx * travel), SIZE - DIGIT - max(0, dx * travel)
        start = (int(torch.randint(lo_y, hi_y + 1, (1,), generator=g)), int(torch.randint(lo_x, hi_x + 1, (1,), generator=g)))
        text = prompt(int(labels[k]), direction)
        rows.append(
            make_row(
                f"{split}-{i:05d}", encoder(text), text, render_clip(images[k], direction, start, speed),
                file_name=f"digits/{split}/{i:05d}", width=SIZE, height=SIZE, num_frames=FRAMES, fps=8.0,
                duration_sec=FRAMES / 8.0,
            )
        )
    return rows


def speeds_error(speeds: Sequence[int]) -> Optional[str]:
    if not speeds or any(not 1 <= s <= MAX_SPEED for s in speeds) or len(set(speeds)) < len(speeds):
        return (f"data.speeds={list(speeds)}: give distinct speeds, each 1 to {MAX_SPEED} pixels per frame "
                f"(a {DIGIT}px digit crossing a {SIZE}px canvas in {FRAMES} frames)")
    return None


def ensure_digits(split: str, cache: Optional[str] = None, seed: int = 0, speeds: Sequence[int] = (SPEED,),
                  frames: int = FRAMES) -> Path:
    """The folder of the split's parquet shards (clips of FRAMES frames, or still images
    with frames=1), built on first use."""
    if split not in CLIPS:
        raise ValueError(f"data.split={split}: allowed values are {sorted(CLIPS)}")
    error = speeds_error(speeds)
    if error:
        raise ValueError(error)
    folder = Path(cache) if cache else default_cache()
    name = f"digits-v{VERSION}-seed{seed}" + ("" if list(speeds) == [SPEED] else "-speeds" + "-".join(map(str, speeds)))
    name += "-stills" if frames == 1 else ""
    folder = folder / name / split
    if folder.is_dir():
        return folder
    with cache_lock(folder.parent):
        if not folder.is_dir():  # nobody built it while this process waited
            log.info("building the moving-digits %s split (%d clips; once, cached in %s)", split, CLIPS[split], folder)
            building = folder.with_name(f".{split}.building")  # the lock's holder alone writes it
            shutil.rmtree(building, ignore_errors=True)  # what an interrupted build left
            rows = make_stills(split, CLIPS[split], seed) if frames == 1 else make_clips(split, CLIPS[split], seed,
                                                                                       tuple(speeds))
            write_dataset(rows, building, rows_per_shard=2048, row_group_size=64)
            building.rename(folder)
    return folder
