"""CLIP score of text-to-video samples: for each video, the mean over its frames
of 100 x max(cos(image embedding, prompt embedding), 0) (the CLIP score of
Hessel et al. 2021 with w = 100, as torchmetrics' CLIPScore), then the mean
over videos. The CLIP is a local transformers folder (CLIPModel and its
processor): nothing downloads."""

from pathlib import Path
from typing import Dict, List, Tuple

import torch

from distill.evaluation.prompts import Item
from distill.validation.media import to_uint8


class ClipScore:
    name = "clip_score"

    def __init__(self, folder: str, device: torch.device):
        from transformers import AutoProcessor, CLIPModel

        self.model = CLIPModel.from_pretrained(folder, local_files_only=True).eval().to(device)
        self.processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
        self.device = device

    @torch.no_grad()
    def video_score(self, prompt: str, pixels: torch.Tensor) -> float:
        """pixels [C, T, H, W] in [-1, 1]."""
        frames = list(to_uint8(pixels[None])[0].numpy())  # T x [H, W, 3]
        inputs = self.processor(text=[prompt], images=frames, return_tensors="pt", padding=True, truncation=True)
        out = self.model(**{k: v.to(self.device) for k, v in inputs.items()})
        cosine = out.image_embeds @ out.text_embeds.T  # both unit vectors: [T, 1]
        return (100 * cosine.clamp(min=0)).mean().item()

    def __call__(self, videos: List[Tuple[Item, torch.Tensor]], out: Path) -> Dict[str, float]:
        scores = [self.video_score(item.prompt, pixels) for item, pixels in videos]
        return {"clip_score": sum(scores) / len(scores)}
