"""Frechet video distance: the Frechet distance between Gaussians fitted to I3D
features of the evaluated videos and of reference videos (the teacher's
evaluation videos of the same prompts and seeds, or any folder of clips).

Each clip's frames are resized to 224 x 224 (bilinear) and fed in [-1, 1] as
[1, 3, T, 224, 224]. The I3D is a local file: TorchScript (the TF-Hub-matching
`i3d_torchscript.pt` most FVD code uses, called with rescale=False,
resize=False, return_features=True where its forward takes them) or a state
dict of the Inception-I3D port (distill/evaluation/i3d.py)."""

from pathlib import Path
from typing import Callable, Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from distill.evaluation.i3d import from_state_dict
from distill.evaluation.prompts import Item
from distill.validation.digit_metrics import _gaussian, frechet_distance
from distill.validation.media import read_clip

VIDEO_SUFFIXES = (".mp4", ".gif", ".webm", ".mkv", ".avi")
SIZE = 224


def load_i3d(path: str, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """The network as clips [N, 3, T, 224, 224] -> features [N, D]."""
    try:
        network = torch.jit.load(path, map_location=device).eval()
    except RuntimeError:  # not a TorchScript archive: a state dict
        network = from_state_dict(torch.load(path, map_location="cpu", weights_only=True)).to(device).eval()
        return network
    arguments = {a.name for a in network.forward.schema.arguments}
    if "return_features" in arguments:
        return lambda clips: network(clips, rescale=False, resize=False, return_features=True)
    return network


def reference_videos(folder: Path) -> List[Path]:
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES and
                  not p.name.startswith("."))


class FVD:
    name = "fvd"

    def __init__(self, i3d: str, reference: str, device: torch.device):
        self.network = load_i3d(i3d, device)
        self.reference = reference_videos(Path(reference))
        self.device = device
        self._reference_features = None  # read and computed at the first call, the same for every later one

    @torch.no_grad()
    def features(self, pixels: torch.Tensor) -> np.ndarray:
        """pixels [3, T, H, W] in [-1, 1] -> the clip's I3D features [D]."""
        frames = F.interpolate(pixels.float().transpose(0, 1), size=(SIZE, SIZE), mode="bilinear",
                               align_corners=False)
        clip = frames.transpose(0, 1)[None].clamp(-1, 1).to(self.device)
        return self.network(clip).reshape(-1).double().cpu().numpy()

    def distance(self, clips: List[torch.Tensor], reference: List[torch.Tensor]) -> float:
        return self._frechet(clips, np.stack([self.features(c) for c in reference]))

    def _frechet(self, clips: List[torch.Tensor], reference_features: np.ndarray) -> float:
        a = np.stack([self.features(c) for c in clips])
        return frechet_distance(*_gaussian(a), *_gaussian(reference_features))

    def __call__(self, videos: List[Tuple[Item, torch.Tensor]], out: Path) -> Dict[str, float]:
        if self._reference_features is None:
            self._reference_features = np.stack([self.features(read_clip(p)) for p in self.reference])
        return {"fvd": self._frechet([pixels for _, pixels in videos], self._reference_features)}
