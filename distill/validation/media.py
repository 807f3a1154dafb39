"""Sample clips as pictures: a PNG grid (one row per sample, one column per
frame) and an animated GIF (all samples side by side)."""

from pathlib import Path

import torch
from PIL import Image


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """[N, C, T, H, W] in [-1, 1] -> [N, T, H, W, 3] uint8 (gray for 1 channel)."""
    pixels = pixels.float().clamp(-1, 1).cpu()
    if pixels.shape[1] == 1:
        pixels = pixels.expand(-1, 3, -1, -1, -1)
    pixels = pixels[:, :3]
    return ((pixels + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1)


def _upscale(image: Image.Image, min_side: int = 96) -> Image.Image:
    scale = max(1, min_side // min(image.size))
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST)


def save_grid(pixels: torch.Tensor, path: Path, pad: int = 1) -> Path:
    frames = to_uint8(pixels)  # [N, T, H, W, 3]
    n, t, h, w, _ = frames.shape
    canvas = torch.full((n * (h + pad) + pad, t * (w + pad) + pad, 3), 255, dtype=torch.uint8)
    for i in range(n):
        for j in range(t):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            canvas[y : y + h, x : x + w] = frames[i, j]
    image = Image.fromarray(canvas.numpy())
    _upscale(image, min_side=4 * max(h, w)).save(path)
    return path


def save_gif(pixels: torch.Tensor, path: Path, fps: int = 4, pad: int = 1) -> Path:
    frames = to_uint8(pixels)
    n, t, h, w, _ = frames.shape
    images = []
    for j in range(t):
        canvas = torch.full((h + 2 * pad, n * (w + pad) + pad, 3), 255, dtype=torch.uint8)
        for i in range(n):
            canvas[pad : pad + h, pad + i * (w + pad) : pad + i * (w + pad) + w] = frames[i, j]
        images.append(_upscale(Image.fromarray(canvas.numpy()), min_side=4 * h))
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return path
