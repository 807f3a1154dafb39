"""Quality metrics for the moving-digits demo.

A small CNN trained once on real frames of the train split (cached beside
the dataset) gives
  - conditional accuracy: the fraction of clips whose frames, averaged over
    time, are classified as the digit their prompt names;
  - Frechet distance between the classifier's penultimate features of
    generated frames and of real train frames (the FID recipe on a digit
    classifier instead of Inception);
  - given the prompts' directions, direction accuracy: the fraction of clips
    whose digit's centre of brightness moves, from the first scored frame to
    the last, most along the prompted direction;
  - given also the data's speeds, motion error: how far, in pixels per frame,
    the digit's moves between consecutive frames are from a move the data
    makes (one of its speeds along the prompted direction, the one that fits
    the clip best), from the first frame on; 0 for real clips. The centre here
    is that of the pixels brighter than mid-grey, so that a faint background
    does not pull it. A blend of two speeds, what a few-step sampler averaging
    over them draws, is half a pixel per frame off.
For image-to-video the first frame is given and shows the digit: clips are
scored from frame 2 (motion from the given frame on), and each scored frame is
classified alone, since a mean of logits over frames would let a sharp frame
carry blurred ones.
"""

import logging
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from distill.data.digits import DIRECTIONS, TEXT_DIM, TEXT_LEN, cache_lock, default_cache, ensure_digits
from distill.data.parquet import ParquetIndex, ParquetLatents, Shapes

log = logging.getLogger("distill")

CLASSIFIER_VERSION = 1
SHAPES = Shapes((1, 4, 16, 16), TEXT_LEN, TEXT_DIM)


class DigitClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 4 * 4, 64), nn.ReLU(),
        )
        self.head = nn.Linear(64, 10)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(frames))


def real_clips(split: str, cache=None, seed: int = 0):
    """(clips [N, 1, 4, 16, 16], digit labels [N]) of a split."""
    folder = ensure_digits(split, cache, seed)
    ds = ParquetLatents(ParquetIndex(str(folder), SHAPES), SHAPES, batch_size=1, seed=0)
    clips = torch.stack([ds.read_row(i)["latent"] for i in range(ds.index.num_rows)])
    labels = torch.tensor([int(c.split()[2]) for c in _captions(folder)])
    return clips, labels


def _captions(folder: Path):
    import pyarrow.parquet as pq

    return [c for f in sorted(folder.glob("*.parquet")) for c in pq.read_table(f, columns=["caption"]).column("caption").to_pylist()]


def frames_of(clips: torch.Tensor) -> torch.Tensor:
    """[N, 1, T, H, W] -> [N*T, 1, H, W]."""
    n, c, t, h, w = clips.shape
    return clips.permute(0, 2, 1, 3, 4).reshape(n * t, c, h, w)


class DigitMetrics:
    """The cached classifier and the real-frame feature statistics."""

    def __init__(self, cache=None, seed: int = 0):
        folder = Path(cache) if cache else default_cache()
        file = folder / f"digit-classifier-v{CLASSIFIER_VERSION}-seed{seed}.safetensors"
        self.model = DigitClassifier()
        if not file.is_file():
            with cache_lock(folder):  # one process trains it, the others wait and read it
                if not file.is_file():
                    self._train_and_save(cache, seed, file)
        from safetensors.torch import load_file

        state = load_file(str(file))
        self.real_mu, self.real_sigma = state.pop("real_mu").double().numpy(), state.pop("real_sigma").double().numpy()
        self.model.load_state_dict(state)
        self.model.eval()

    def _train_and_save(self, cache, seed: int, file: Path) -> None:
        from safetensors.torch import save_file

        log.info("training the digit classifier for the demo's metrics (once, cached as %s)", file)
        self._train(cache, seed)
        state = dict(self.model.state_dict(), real_mu=torch.from_numpy(self.real_mu), real_sigma=torch.from_numpy(self.real_sigma))
        partial = file.with_name(f".{file.name}.partial")  # the lock's holder alone writes it
        save_file({k: v.contiguous() for k, v in state.items()}, str(partial))
        partial.rename(file)  # whole or absent: a reader never sees half a file

    def _train(self, cache, seed: int) -> None:
        clips, labels = real_clips("train", cache, seed)
        frames, frame_labels = frames_of(clips), labels.repeat_interleave(clips.shape[2])
        g = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.model = DigitClassifier()
        opt = torch.optim.Adam(self.model.parameters(), lr=2e-3)
        for _ in range(3):
            order = torch.randperm(len(frames), generator=g)
            for start in range(0, len(frames), 256):
                idx = order[start : start + 256]
                loss = F.cross_entropy(self.model(frames[idx]), frame_labels[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        self.model.eval()
        self.real_mu, self.real_sigma = _gaussian(self.features(frames))

    @torch.no_grad()
    def features(self, frames: torch.Tensor) -> np.ndarray:
        return torch.cat([self.model.features(frames[i : i + 1024]) for i in range(0, len(frames), 1024)]).double().numpy()

    @torch.no_grad()
    def __call__(self, clips: torch.Tensor, labels: torch.Tensor, directions: Optional[Sequence[str]] = None,
                 first: int = 0, speeds: Optional[Sequence[int]] = None, per_frame: bool = False,
                 prompts: Optional[Sequence[str]] = None) -> Dict[str, float]:
        """accuracy and frechet_distance of clips [N, 1, T, 16, 16] in [-1, 1] from frame
        `first` (0-based) on; accuracy per clip (logits averaged over its frames) or
        per_frame; direction_accuracy when the prompts' directions are given, and
        motion_error when the data's speeds are given too; prompt_diversity when the
        prompts are given (`prompt_diversity`)."""
        whole = clips.float().clamp(-1, 1).cpu()
        clips = whole[:, :, first:]
        frames = frames_of(clips)
        logits = self.model(frames).reshape(clips.shape[0], clips.shape[2], 10)
        labels = labels.cpu()
        if per_frame:
            accuracy = (logits.argmax(dim=2) == labels[:, None]).float().mean().item()
        else:
            accuracy = (logits.mean(dim=1).argmax(dim=1) == labels).float().mean().item()
        features = self.features(frames)
        mu, sigma = _gaussian(features)
        out = {"accuracy": accuracy, "frechet_distance": frechet_distance(mu, sigma, self.real_mu, self.real_sigma)}
        if prompts is not None:
            out["prompt_diversity"] = prompt_diversity(features.reshape(clips.shape[0], clips.shape[2], -1).mean(1),
                                                       prompts)
        if directions is not None:
            out["direction_accuracy"] = (motion_direction(clips) == direction_index(directions)).float().mean().item()
        if directions is not None and speeds is not None:
            out["motion_error"] = motion_error(whole, direction_index(directions), speeds).mean().item()
        return out


def prompt_diversity(features: np.ndarray, prompts: Sequence[str]) -> float:
    """The spread of what one prompt gives: for each prompt among `prompts` that more than
    one clip has (other seeds), the mean distance between its clips' classifier features
    [N, F] (the Frechet distance's, averaged over frames), averaged over those prompts.
    A mode-collapsed generator scores near 0; real clips of the prompts, their data's spread."""
    groups: Dict[str, list] = {}
    for row, prompt in enumerate(prompts):
        groups.setdefault(prompt, []).append(row)
    spreads = []
    for rows in groups.values():
        if len(rows) > 1:
            f = features[rows]
            distances = np.sqrt(((f[:, None] - f[None]) ** 2).sum(-1))
            spreads.append(distances[np.triu_indices(len(rows), 1)].mean())
    return float(np.mean(spreads)) if spreads else float("nan")


def centre(frames: torch.Tensor, floor: float = -1.0) -> torch.Tensor:
    """[..., H, W] in [-1, 1] -> the centre of brightness (y, x) [..., 2], each pixel
    weighted by how far it is above `floor`."""
    weight = (frames - floor).clamp_min(0)
    total = weight.sum(dim=(-2, -1)).clamp_min(1e-6)
    ys = torch.arange(frames.shape[-2], dtype=frames.dtype)
    xs = torch.arange(frames.shape[-1], dtype=frames.dtype)
    return torch.stack([(weight.sum(-1) * ys).sum(-1) / total, (weight.sum(-2) * xs).sum(-1) / total], dim=-1)


def motion_direction(clips: torch.Tensor) -> torch.Tensor:
    """Clips [N, 1, T, H, W] -> the index in DIRECTIONS of the move from the first
    frame's centre of brightness to the last's that is most along it."""
    points = centre(clips[:, 0])  # [N, T, 2]
    move = points[:, -1] - points[:, 0]
    units = direction_units(move.dtype)
    return (move @ units.T).argmax(dim=1)


def motion_error(clips: torch.Tensor, directions: torch.Tensor, speeds: Sequence[int]) -> torch.Tensor:
    """Clips [N, 1, T, H, W], direction indices [N] -> [N]: the mean distance (px)
    between the bright pixels' centre's moves from frame to frame and `speed`
    pixels along the direction, for the speed of `speeds` that fits the clip best."""
    points = centre(clips[:, 0], floor=0.0)  # [N, T, 2]
    moves = points[:, 1:] - points[:, :-1]  # [N, T-1, 2]
    units = direction_units(moves.dtype)[directions]  # [N, 2]
    errors = [(moves - s * units[:, None]).norm(dim=-1).mean(dim=1) for s in speeds]
    return torch.stack(errors).min(dim=0).values


def direction_units(dtype: torch.dtype) -> torch.Tensor:
    """[4, 2]: (dy, dx) of each direction, in DIRECTIONS' order."""
    return torch.tensor(list(DIRECTIONS.values()), dtype=dtype)


def direction_index(directions: Sequence[str]) -> torch.Tensor:
    names = list(DIRECTIONS)
    return torch.tensor([names.index(d) for d in directions])


def _gaussian(features: np.ndarray):
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)).

    Tr((S1 S2)^(1/2)) = Tr((A S2 A)^(1/2)) with A = S1^(1/2): both square roots
    are of symmetric positive semi-definite matrices, taken by eigendecomposition
    (eigenvalues rounded below zero are clipped), so a singular covariance
    needs no retry and raises no warning."""
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product(sigma1, sigma2))


def psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    root = psd_sqrt(sigma1)
    inner = root @ sigma2 @ root
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum())
