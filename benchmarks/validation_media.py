"""Writing a validation GIF: each sheet quantised by Pillow's fast octree (what
distill.validation.media.save_gif does) against Pillow's default for RGB
frames (an adaptive palette by median cut, what it did before).

Every validation writes one GIF per sampler (student, teacher references), so
at the tiny test VAE's 128x128 frames the default's seconds added up over the
suite; at Wan's 480x832 the sheets are 16x larger. Alternates the two ways
call by call (machine noise hits both alike) and prints the median seconds of
each, their ratio, and how far the octree's frames are from the sheets' pixels.

    python benchmarks/validation_media.py [--clips 16] [--frames 9] [--size 128] [--iters 5]
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distill.validation.media import playing_sheets, save_gif  # noqa: E402


def median_cut_gif(pixels, path, captions):
    """The GIF as written before: Pillow converts each RGB sheet itself."""
    images = playing_sheets(pixels, captions, 4, 16)
    images[0].save(path, save_all=True, append_images=images[1:], duration=250, loop=0)


def frame_error(pixels, path, captions) -> float:
    """Mean absolute difference (0-255) between the sheets and the GIF's decoded frames."""
    sheets = playing_sheets(pixels, captions, 4, 16)
    gif, errors = Image.open(path), []
    for i, sheet in enumerate(sheets):
        gif.seek(i)
        errors.append(np.abs(np.asarray(gif.convert("RGB"), np.float32) - np.asarray(sheet, np.float32)).mean())
    return float(np.mean(errors))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=16)
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    # smooth colour fields, as decoded samples are, rather than per-pixel noise
    coarse = torch.rand(args.clips, 3, args.frames, args.size // 16, args.size // 16) * 2 - 1
    pixels = torch.nn.functional.interpolate(coarse, size=(args.frames, args.size, args.size), mode="trilinear")
    captions = [f"a prompt for clip {i}" for i in range(args.clips)]
    folder = Path(tempfile.mkdtemp())
    times = {"median cut (before)": [], "fast octree (now)": []}
    for _ in range(args.iters):
        start = time.perf_counter()
        median_cut_gif(pixels, folder / "before.gif", captions)
        times["median cut (before)"].append(time.perf_counter() - start)
        start = time.perf_counter()
        save_gif(pixels, folder / "now.gif", captions)
        times["fast octree (now)"].append(time.perf_counter() - start)
    sheet = playing_sheets(pixels[:1], captions, 4, 16)[0]
    print(f"{args.clips} clips x {args.frames} frames of {args.size}x{args.size}; the sheet of all clips is "
          f"{playing_sheets(pixels, captions, 4, 16)[0].size}, one clip's {sheet.size}")
    for name, values in times.items():
        print(f"{name:22s} median {statistics.median(values):.3f} s over {args.iters}")
    ratio = statistics.median(times["median cut (before)"]) / statistics.median(times["fast octree (now)"])
    print(f"ratio (before / now): {ratio:.1f}x")
    for name, file in (("median cut", "before.gif"), ("fast octree", "now.gif")):
        print(f"{name:22s} mean |frame - sheet|: {frame_error(pixels, folder / file, captions):.2f} of 255")


if __name__ == "__main__":
    main()
