"""Videos or images + captions -> a parquet latent dataset (FastVideo's schema).

    python -m distill.preprocess --model PATH --captions captions.jsonl --videos DIR --out DIR \\
        [--height 480 --width 832 --frames 81] [--batch-size 4] [--rows-per-shard 256]
    python -m distill.preprocess --model QWEN_IMAGE --captions captions.jsonl --videos IMAGES --out DIR \\
        --frames 1 --height 1328 --width 1328           # images: one-frame latents
    python -m distill.preprocess --model PATH --captions captions.jsonl --out DIR --text-only
    python -m distill.preprocess --task i2v ...                # image-to-video: FastVideo's i2v schema
    torchrun --nproc-per-node 8 -m distill.preprocess ...      # each rank takes every 8th clip

The captions file is JSON lines ({"file_name": ..., "caption": ...}) or a CSV
with the columns file_name,caption; a row's id is its file_name. PATH is a
diffusers folder of a model family (`--family`; by default the family whose
transformer or VAE class the folder's config.json names) whose encoders are
used: for Wan `vae/` (AutoencoderKLWan), `text_encoder/` (UMT5EncoderModel)
and `tokenizer/`; for Qwen-Image `vae/` (AutoencoderKLQwenImage) and
Qwen2.5-VL through QwenImagePipeline's own prompt encoding; for LTX-2 `vae/`,
`audio_vae/` and Gemma-3 through LTX2Pipeline's prompt encoding and its
`connectors/` (distill/models/ltx2_encoders.py). A family that generates sound
with the video (LTX-2) also reads each clip's audio track: the first
frames / fps seconds (`--fps`: the clips' frame rate), resampled by FFmpeg to
its VAE's rate, padded with silence where the track ends sooner; a clip
without an audio track is skipped. Its latent is then the family's joint
sample (both latents, in model space). A file named
.png, .jpg, .jpeg, .webp or .bmp is an image: one frame (`--frames 1`),
media_type image. Frames are resized to cover
height x width, centre-cropped, and the first `frames` are kept; the latent
is the VAE posterior mean, un-normalised, [C, T, H/s, W/s] (s = 8 for the Wan2.1
VAE, 16 for Wan2.2's); the text
embedding is the encoder output with padding removed [L, D].

`--task i2v` writes FastVideo's image-to-video schema: besides the above, the
VAE latent of the clip's first frame followed by black frames
(`first_frame_latent`, [C, T, H/s, W/s], un-normalised; its first latent frame
is the image's own), the first frame's pixels (`pil_image`, [H, W, 3] uint8,
for validation) and, where the model folder has `image_encoder/` and
`image_processor/` (Wan2.1 I2V), the CLIP encoder's penultimate hidden states
of that frame (`clip_feature`, [tokens, D]); empty columns otherwise.

The negative prompt (`--negative-prompt`, default the family's standard one)
is encoded to OUT/negative_embedding.safetensors, which `data=parquet` uses
for classifier-free guidance unless data.negative_embedding names another.

Ids already present in the output's shards are skipped, so a rerun finishes
an interrupted job. Unreadable or too short videos are skipped with their
reason and counted. Shards are written under a temporary name and renamed.
"""

import argparse
import csv
import json
import logging
import sys
from collections import Counter
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from distill.data.schema import CLIP, FIRST_FRAME, IMAGE, make_row
from distill.data.writer import RankShards
from distill.distributed import rank_env

log = logging.getLogger("distill.preprocess")


class SkipVideo(Exception):
    """A clip that cannot be used; the message is the reason."""


def read_captions(path: Path) -> List[Dict[str, str]]:
    if path.suffix == ".csv":
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    else:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for i, row in enumerate(rows):
        if "file_name" not in row or "caption" not in row:
            raise ValueError(f"{path} row {i}: needs the fields file_name and caption")
    return rows


def done_ids(out: Path) -> set:
    ids = set()
    for shard in out.glob("*.parquet"):
        ids.update(pq.read_table(shard, columns=["id"]).column("id").to_pylist())
    return ids


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def load_clip(path: Path, frames: int, height: int, width: int) -> torch.Tensor:
    """[3, frames, height, width] in [-1, 1], or SkipVideo."""
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return load_image(path, frames, height, width)
    import av

    try:
        with av.open(str(path)) as container:
            decoded = []
            for frame in container.decode(video=0):
                decoded.append(torch.from_numpy(frame.to_ndarray(format="rgb24")))
                if len(decoded) == frames:
                    break
    except (av.error.FFmpegError, OSError) as err:
        raise SkipVideo(f"unreadable ({type(err).__name__}: {err})") from None
    if len(decoded) < frames:
        raise SkipVideo(f"too short ({len(decoded)} frames < {frames})")
    return cover_and_crop(torch.stack(decoded), height, width)


def load_audio(path: Path, samples: int, rate: int, channels: int) -> torch.Tensor:
    """The clip's first `samples` of sound as [channels, samples] float at `rate` (FFmpeg
    resamples and remixes), padded with silence where the track ends sooner; SkipVideo
    where the file has no audio stream."""
    import av

    chunks = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise SkipVideo("no audio stream (the model generates sound with the video)")
            resampler = av.AudioResampler(format="fltp", layout="mono" if channels == 1 else "stereo", rate=rate)
            for frame in container.decode(audio=0):
                chunks += [out.to_ndarray() for out in resampler.resample(frame)]
                if sum(c.shape[1] for c in chunks) >= samples:
                    break
            chunks += [out.to_ndarray() for out in resampler.resample(None)]  # what the resampler still holds
    except (av.error.FFmpegError, OSError) as err:
        raise SkipVideo(f"unreadable audio ({type(err).__name__}: {err})") from None
    wave = torch.from_numpy(np.concatenate(chunks, axis=1)[:, :samples]) if chunks else torch.zeros(channels, 0)
    return F.pad(wave.float(), (0, samples - wave.shape[1]))


def load_image(path: Path, frames: int, height: int, width: int) -> torch.Tensor:
    """An image file as a one-frame clip [3, 1, height, width], or SkipVideo."""
    from PIL import Image, UnidentifiedImageError

    if frames != 1:
        raise SkipVideo(f"an image, not a video (--frames {frames}; image datasets take --frames 1)")
    try:
        with Image.open(path) as image:
            pixels = torch.from_numpy(np.asarray(image.convert("RGB")).copy())
    except (UnidentifiedImageError, OSError) as err:
        raise SkipVideo(f"unreadable ({type(err).__name__}: {err})") from None
    return cover_and_crop(pixels[None], height, width)


def cover_and_crop(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Frames [F, h, w, 3] uint8 -> resized to cover height x width, centre-cropped,
    [3, F, height, width] in [-1, 1]."""
    video = frames.permute(0, 3, 1, 2).float() / 127.5 - 1  # [F, 3, h, w]
    scale = max(height / video.shape[2], width / video.shape[3])
    size = (max(height, round(video.shape[2] * scale)), max(width, round(video.shape[3] * scale)))
    video = F.interpolate(video, size=size, mode="bilinear", antialias=True, align_corners=False)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    return video[:, :, top : top + height, left : left + width].permute(1, 0, 2, 3).clamp(-1, 1)


def image_condition_clip(clip: torch.Tensor) -> torch.Tensor:
    """[3, F, H, W] -> its first frame followed by F - 1 black (zero) frames, as the
    Wan image-to-video pipelines encode the conditioning image."""
    return torch.cat([clip[:, :1], torch.zeros_like(clip[:, 1:])], dim=1)


def first_frame_pixels(clip: torch.Tensor) -> torch.Tensor:
    """[3, F, H, W] in [-1, 1] -> the first frame as [H, W, 3] uint8."""
    from distill.validation.media import to_uint8

    return to_uint8(clip[None, :, :1])[0, 0].contiguous()


def write_negative_embedding(encoders, prompt: str, out: Path) -> Path:
    """The negative prompt's embedding [L, D] beside the shards, where data=parquet finds it."""
    from safetensors.torch import save_file

    from distill.data import NEGATIVE_FILE

    file = out / NEGATIVE_FILE
    tmp = file.with_name(file.name + ".tmp")
    save_file({"text_embeds": encoders.text([prompt])[0].contiguous()}, str(tmp), metadata={"prompt": prompt})
    tmp.rename(file)
    log.info("negative prompt embedding -> %s", file)
    return file


def batched(items: List, size: int) -> Iterable[List]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def preprocess(args) -> Counter:
    rank, world_size, _ = rank_env()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    items = read_captions(Path(args.captions))
    done = done_ids(out)
    mine = [row for i, row in enumerate(items) if i % world_size == rank and row["file_name"] not in done]
    counts = Counter(already_done=sum(row["file_name"] in done for row in items[rank::world_size]))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from distill.models import build_adapter
    from distill.registry import family_class

    adapter = build_adapter(family_class(args.family).config_class(path=str(args.model)))
    encoders = adapter.encoders(Path(args.model), args.text_only, args.max_text_len, device, image=args.task == "i2v")
    if rank == 0:
        prompt = adapter.default_negative_prompt if args.negative_prompt is None else args.negative_prompt
        write_negative_embedding(encoders, prompt, out)
    shards = RankShards(out, rank, args.rows_per_shard, args.row_group_size)
    # a family that generates sound with the video (LTX-2) encodes each clip's audio too
    hears = not args.text_only and hasattr(encoders, "audio_rate")
    samples = hears and round(args.frames / args.fps * encoders.audio_rate)
    for chunk in batched(mine, args.batch_size):
        clips, sounds, kept = [], [], []
        for row in chunk:
            if args.text_only:
                kept.append(row)
                continue
            path = Path(args.videos) / row["file_name"]
            try:
                clip = load_clip(path, args.frames, args.height, args.width)
                if hears:
                    sounds.append(load_audio(path, samples, encoders.audio_rate, encoders.audio_channels))
                clips.append(clip)
                kept.append(row)
            except SkipVideo as reason:
                log.warning("skipped %s: %s", row["file_name"], reason)
                counts["skipped: " + str(reason).split(" (")[0]] += 1
        if not kept:
            continue
        texts = encoders.text([row["caption"] for row in kept])
        latents = [None] * len(kept)
        if clips:
            latents = encoders.video(torch.stack(clips), **({"audio": torch.stack(sounds)} if hears else {}))
        images = [None] * len(kept)
        if args.task == "i2v":
            if hasattr(encoders, "image_latents"):  # the image encoded alone (LTX-2's pipeline)
                firsts = encoders.image_latents(torch.stack([c[:, :1] for c in clips]))
            else:  # the image followed by black frames (Wan's pipelines)
                firsts = encoders.video(torch.stack([image_condition_clip(c) for c in clips]))
            pixels = [first_frame_pixels(c) for c in clips]
            features = encoders.image(torch.stack(pixels)) if encoders.image_encoder else [None] * len(clips)
            images = [{CLIP: c, FIRST_FRAME: f, IMAGE: p} for c, f, p in zip(features, firsts, pixels)]
        for row, text, latent, image in zip(kept, texts, latents, images):
            meta = {} if args.text_only else dict(
                width=args.width, height=args.height, num_frames=args.frames, fps=args.fps,
                duration_sec=args.frames / args.fps,
                media_type="image" if Path(row["file_name"]).suffix.lower() in IMAGE_SUFFIXES else "video",
            )
            shards.add(make_row(row["file_name"], text, row["caption"], latent, i2v=image, file_name=row["file_name"],
                                **meta))
        counts["written"] += len(kept)
    shards.close()
    return counts


def parse_args(argv: Optional[List[str]] = None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="diffusers pipeline folder with vae/, text_encoder/, tokenizer/")
    p.add_argument("--family", help="the model family whose encoders to use (model.family; default: the one "
                   "whose transformer or VAE class the folder names)")
    p.add_argument("--captions", required=True, help="JSON lines or CSV of file_name, caption")
    p.add_argument("--videos", help="folder the file names are relative to")
    p.add_argument("--out", required=True)
    p.add_argument("--text-only", action="store_true", help="captions only: a dataset for data-free DMD")
    p.add_argument("--task", choices=["t2v", "i2v"], default="t2v",
                   help="i2v: also the first frame's latent and pixels (FastVideo's image-to-video schema)")
    p.add_argument("--negative-prompt", help="the prompt CFG guides away from (default: the model family's "
                   "standard negative prompt, empty where it has none); written to DIR/negative_embedding.safetensors")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--fps", type=float, default=16.0, help="the clips' frame rate (metadata; the span of sound an "
                   "audio-video family encodes with the frames)")
    p.add_argument("--max-text-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--rows-per-shard", type=int, default=256)
    p.add_argument("--row-group-size", type=int, default=8)
    args = p.parse_args(argv)
    if not args.text_only and not args.videos:
        p.error("--videos is required unless --text-only")
    if args.task == "i2v" and args.text_only:
        p.error("--task i2v needs the videos (the first frame is the condition): drop --text-only")
    if args.family is None:  # before anything is written
        from distill.models import family_of_folder

        try:
            args.family = family_of_folder(Path(args.model))
        except ValueError as err:
            p.error(str(err))
    return args


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s] %(message)s")
    counts = preprocess(parse_args(argv))
    summary = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
    print(f"rank {rank_env()[0]}: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
