"""Sample clips as pictures: a PNG grid (each clip's frames side by side,
`per_row` clips a row) and an animated GIF (the clips in a grid, playing).
Each clip carries its prompt as a caption under it (the PNG also keeps the
prompts as JSON in its `captions` text chunk). At most `limit` clips are drawn."""

import json
from fractions import Fraction
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

PAD = 4  # pixels between tiles, at the saved scale
CAPTION_HEIGHT = 14  # one line of PIL's default bitmap font


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """[N, C, T, H, W] in [-1, 1] -> [N, T, H, W, 3] uint8 (gray for 1 channel)."""
    pixels = pixels.float().clamp(-1, 1).cpu()
    if pixels.shape[1] == 1:
        pixels = pixels.expand(-1, 3, -1, -1, -1)
    pixels = pixels[:, :3]
    return ((pixels + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1)


def fit_text(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """`text`, shortened with '...' until it fits `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def sheet(tiles: torch.Tensor, captions: Optional[Sequence[str]], per_row: int, scale: int) -> Image.Image:
    """[N, H, W, 3] uint8 tiles, scaled, `per_row` a row on white, each with its caption below."""
    n, h, w, _ = tiles.shape
    tile_w, tile_h = w * scale, h * scale
    band = CAPTION_HEIGHT if captions else 0
    cols, rows = min(n, per_row), -(-n // per_row)
    canvas = Image.new("RGB", (cols * (tile_w + PAD) + PAD, rows * (tile_h + band + PAD) + PAD), "white")
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    for i in range(n):
        x = PAD + (i % per_row) * (tile_w + PAD)
        y = PAD + (i // per_row) * (tile_h + band + PAD)
        canvas.paste(Image.fromarray(tiles[i].numpy()).resize((tile_w, tile_h), Image.NEAREST), (x, y))
        if captions:
            draw.text((x, y + tile_h + 1), fit_text(draw, captions[i], font, tile_w), fill="black", font=font)
    return canvas


def auto_scale(height: int, width: int, captions: Optional[Sequence[str]]) -> int:
    """Small clips are enlarged to about 64 pixels high, and wide enough for their captions."""
    scale = max(1, 64 // height)
    if captions:
        font = ImageFont.load_default()
        longest = max(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(c, font=font) for c in captions)
        scale = max(scale, min(-(-int(longest) // width), 12))
    return scale


def save_grid(pixels: torch.Tensor, path: Path, captions: Optional[List[str]] = None, per_row: int = 4,
              limit: int = 16, max_frames: int = 8) -> Path:
    """Up to `max_frames` evenly spaced frames of each clip, left to right."""
    frames = to_uint8(pixels[:limit])  # [N, T, H, W, 3]
    keep = torch.linspace(0, frames.shape[1] - 1, min(frames.shape[1], max_frames)).round().long()
    frames = frames[:, keep]
    n, t, h, w, _ = frames.shape
    strips = frames.permute(0, 2, 1, 3, 4).reshape(n, h, t * w, 3)  # a clip's frames left to right
    captions = list(captions[:n]) if captions else None
    info = PngInfo()
    if captions:
        info.add_text("captions", json.dumps(captions))
    sheet(strips, captions, per_row, auto_scale(h, t * w, captions)).save(path, pnginfo=info)
    return path


def playing_sheets(pixels: torch.Tensor, captions: Optional[List[str]], per_row: int, limit: int) -> List[Image.Image]:
    """One captioned sheet per frame: the clips of a GIF or MP4, playing side by side."""
    frames = to_uint8(pixels[:limit])
    captions = list(captions[: frames.shape[0]]) if captions else None
    scale = auto_scale(frames.shape[2], frames.shape[3], captions)
    return [sheet(frames[:, j], captions, per_row, scale) for j in range(frames.shape[1])]


def save_gif(pixels: torch.Tensor, path: Path, captions: Optional[List[str]] = None, fps: int = 4, per_row: int = 4,
             limit: int = 16) -> Path:
    """Each sheet quantised to its own 256 colours by the fast octree: Pillow's default for
    RGB frames (median cut) took 2.90 s for 9 frames of 16 clips at 128x128, the octree
    0.30 s (benchmarks/validation_media.py)."""
    images = [image.quantize(256, method=Image.Quantize.FASTOCTREE)
              for image in playing_sheets(pixels, captions, per_row, limit)]
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return path


def save_mp4(pixels: torch.Tensor, path: Path, captions: Optional[List[str]] = None, fps: float = 8, per_row: int = 4,
             limit: int = 16, sound: Optional[Tuple[torch.Tensor, int]] = None) -> Path:
    """The GIF's captioned grid as an H.264 MP4 (PyAV), padded to even sides as yuv420p needs;
    with `sound` (a waveform [channels, samples] in [-1, 1] and its rate) an AAC track too."""
    import numpy as np

    images = playing_sheets(pixels, captions, per_row, limit)
    width, height = images[0].width + images[0].width % 2, images[0].height + images[0].height % 2
    frames = []
    for image in images:
        canvas = Image.new("RGB", (width, height), "white")
        canvas.paste(image, (0, 0))
        frames.append(np.asarray(canvas))
    return encode_mp4(frames, path, fps, sound)


def save_clip(pixels: torch.Tensor, path: Path, fps: float = 8, sound: Optional[Tuple[torch.Tensor, int]] = None,
              crf: int = 10) -> Path:
    """One clip [C, T, H, W] in [-1, 1] as it is, no caption and no scaling: an MP4 for
    evaluation tools (VBench, FVD) to read (odd sides repeat their last row or column)."""
    frames = to_uint8(pixels[None])[0]  # [T, H, W, 3]
    h, w = frames.shape[1], frames.shape[2]
    frames = torch.nn.functional.pad(frames.permute(0, 3, 1, 2).float(), (0, w % 2, 0, h % 2), mode="replicate")
    return encode_mp4(list(frames.permute(0, 2, 3, 1).to(torch.uint8).numpy()), path, fps, sound, crf)


def encode_mp4(frames: list, path: Path, fps: float, sound: Optional[Tuple[torch.Tensor, int]] = None,
               crf: Optional[int] = None) -> Path:
    """[H, W, 3] uint8 frames (even sides) as H.264 yuv420p at `fps`, with an optional AAC track."""
    import av
    import numpy as np

    with av.open(str(path), mode="w") as container:
        rate = Fraction(fps).limit_denominator(1001)  # 24, 30000/1001, ...
        h264 = "libx264" in av.codecs_available
        stream = container.add_stream("libx264" if h264 else "mpeg4", rate=rate,
                                      options={"crf": str(crf)} if h264 and crf is not None else {})
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        audio = sound and container.add_stream("aac", rate=sound[1], layout=_layout(sound[0]))  # before any packet
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())
        if audio:
            planar = np.ascontiguousarray(sound[0][:2].detach().float().clamp(-1, 1).cpu().numpy())
            frame = av.AudioFrame.from_ndarray(planar, format="fltp", layout=_layout(sound[0]))
            frame.sample_rate = sound[1]
            container.mux(audio.encode(frame))
            container.mux(audio.encode())
    return path


def read_clip(path: Path) -> torch.Tensor:
    """An MP4 (or GIF) back as pixels [3, T, H, W] in [-1, 1]."""
    import av
    import numpy as np

    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    if not frames:
        raise ValueError(f"{path}: no video frames")
    return torch.from_numpy(np.stack(frames)).permute(3, 0, 1, 2).float() / 127.5 - 1


def _layout(waveform: torch.Tensor) -> str:
    return "mono" if waveform.shape[0] == 1 else "stereo"
