"""Sample clips as pictures: a PNG grid (each clip's frames side by side,
`per_row` clips a row) and an animated GIF (the clips in a grid, playing).
At most `limit` clips are drawn."""

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


def _tile(tiles: torch.Tensor, per_row: int, pad: int) -> torch.Tensor:
    """[N, H, W, 3] -> one image with per_row tiles a row, white gaps."""
    n, h, w, _ = tiles.shape
    rows = -(-n // per_row)
    canvas = torch.full((rows * (h + pad) + pad, min(n, per_row) * (w + pad) + pad, 3), 255, dtype=torch.uint8)
    for i in range(n):
        y, x = pad + (i // per_row) * (h + pad), pad + (i % per_row) * (w + pad)
        canvas[y : y + h, x : x + w] = tiles[i]
    return canvas


def save_grid(pixels: torch.Tensor, path: Path, per_row: int = 4, limit: int = 16, scale: int = 4) -> Path:
    frames = to_uint8(pixels[:limit])  # [N, T, H, W, 3]
    n, t, h, w, _ = frames.shape
    strips = frames.permute(0, 2, 1, 3, 4).reshape(n, h, t * w, 3)  # a clip's frames left to right
    image = Image.fromarray(_tile(strips, per_row, pad=2).numpy())
    image.resize((image.width * scale, image.height * scale), Image.NEAREST).save(path)
    return path


def save_gif(pixels: torch.Tensor, path: Path, fps: int = 4, per_row: int = 4, limit: int = 16, scale: int = 4) -> Path:
    frames = to_uint8(pixels[:limit])
    images = []
    for j in range(frames.shape[1]):
        image = Image.fromarray(_tile(frames[:, j], per_row, pad=2).numpy())
        images.append(image.resize((image.width * scale, image.height * scale), Image.NEAREST))
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return path
