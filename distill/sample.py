"""Sample an exported role by prompt, with the sampler its method gave it.

    python -m distill.sample EXPORT_DIR --prompt "the digit 7 moving left" --out clip.gif
    python -m distill.sample EXPORT_DIR --prompt "a cat" --prompt "a dog" --seeds 0 1 --out grid.mp4
        --out FILE             .gif (animated), .png (frames side by side) or .mp4 (PyAV, H.264);
                               one clip alone, several in a grid, each captioned with its prompt;
                               an .mp4 of one clip of a family with sound (LTX-2) carries it (AAC)
        --latents FILE         also write the raw latents and text embeddings (safetensors)
        --seeds S [S ...]      each prompt is sampled once per seed (default: 0)
        --steps N              Euler samplers only (a finetuned model, a critic): N steps
        --model PATH           the pipeline folder with text_encoder/, tokenizer/ and vae/
                               (default: the one the role was trained with)
        --negative-prompt T    the unconditional prompt of guided samplers
        --text-embeds FILE     safetensors with `text_embeds` [N, L, D] instead of prompts
        --lora [--base PATH]   a LoRA role: its base plus EXPORT_DIR/lora, not the merged transformer

Prompts are encoded with the model's text encoder (the hash word vectors of
the digits demo, umT5 for Wan), latents decoded with its VAE (identity for
the demo, the Wan VAE for Wan).
"""

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from distill.config.schema import RoleConfig
from distill.models import build_adapter
from distill.registry import family_class
from distill.roles import Role
from distill.sampling import EulerSampler, FewStepSampler, Sampler

FORMATS = (".gif", ".png", ".mp4", ".safetensors")


def load_exported(folder: Path, lora: bool = False, base=None, model: Optional[str] = None):
    """(adapter, role, sampler) of an export folder; with `lora`, the base network
    (distill.json's, or `base`) with the exported adapters added. The adapter reads
    its text encoder and VAE from `model` (default: the folder recorded at export)."""
    info = json.loads((folder / "distill.json").read_text())
    cfg = exported_model(info, model)
    condition = family_class(cfg.family).batch_condition(cfg)
    if condition != "none":
        raise ValueError(f"{folder} is an image-to-video role (model.image_condition={condition}): "
                         "this command samples from prompts only; load its transformer into the family's "
                         "image-to-video pipeline")
    adapter = build_adapter(cfg)
    if lora:
        if not info.get("lora"):
            raise ValueError(f"{folder} was not trained with LoRA (distill.json has no lora entry)")
        module = adapter.load(base or info["lora"]["base"], seed=info["lora"]["seed"])
        module = adapter.load_lora(module, folder / info["lora"]["folder"])
    else:
        module = adapter.load(str(folder), seed=0)
    if info.get("chunk_frames"):
        module = adapter.make_causal(module)  # generated chunk by chunk over its KV cache
    return adapter, Role("sampler", RoleConfig(), module.eval().requires_grad_(False)), Sampler.from_json(info["sampler"])


def exported_model(info: dict, model: Optional[str]):
    """The model config an export's distill.json records: its family's config class with
    the keys that class has (exports from before a key existed take its default)."""
    schema = OmegaConf.structured(family_class(info["family"]).config_class)
    known = {k: v for k, v in info.items() if k in schema and k != "path"}
    known.setdefault("vae", "identity")  # the oldest exports name neither: the built-in ones
    known.setdefault("text_encoder", "hash")
    node = OmegaConf.merge(schema, known, {"path": model or info.get("model_path")})
    return OmegaConf.to_object(node)


def with_steps(sampler: Sampler, adapter, steps: Optional[int]) -> Sampler:
    if steps is None or steps == sampler.num_steps:
        return sampler
    if isinstance(sampler, FewStepSampler) and not sampler.deterministic and 0 < steps < sampler.num_steps:
        # the first `steps` listed sigmas: each step ends in x0, so a prefix is a shorter
        # sampler of the same student (rCM samples its 4-step student at 1 to 4 so)
        return FewStepSampler(sampler.sigmas[:steps])
    if not isinstance(sampler, EulerSampler):
        raise ValueError(f"--steps {steps}: this role samples in its {sampler.num_steps} distilled steps "
                         "or the first ones of them")
    return EulerSampler(adapter.euler_sigmas(steps), sampler.guidance_scale)


def encode_prompts(adapter, prompts: List[str], negative: Optional[str] = None,
                   device: torch.device = torch.device("cpu")):
    """(text, uncond) embeddings of `prompts` and of the negative prompt (default: the family's
    with the family's encoder; the demo's hash encoder trained on zeros)."""
    text = adapter.encode_prompts(prompts, device)
    if negative is None:
        negative = adapter.default_negative_prompt if adapter.cfg.text_encoder == "family" else ""
    uncond = adapter.encode_prompts([negative] * len(prompts), device) if negative else torch.zeros_like(text)
    return text, uncond


def sample_latents(adapter, role, sampler, text: torch.Tensor, uncond: torch.Tensor, seeds: List[int]) -> torch.Tensor:
    """One sample per row of `text`; row i draws its noise from seeds[i]."""
    samples = []
    for i, seed in enumerate(seeds):
        g = torch.Generator().manual_seed(seed)
        samples.append(sampler(adapter, role, text[i : i + 1], uncond[i : i + 1],
                               lambda shape: torch.randn(shape, generator=g).to(text.device)))
    return torch.cat(samples)


def write_video(pixels: torch.Tensor, path: Path, captions: List[str], fps: float, sound=None) -> None:
    from distill.validation.media import save_gif, save_grid, save_mp4

    if path.suffix == ".gif":
        save_gif(pixels, path, captions, fps=fps, per_row=min(len(captions), 4), limit=len(captions))
    elif path.suffix == ".png":
        save_grid(pixels, path, captions, per_row=1, limit=len(captions))
    else:
        save_mp4(pixels, path, captions, fps=fps, per_row=min(len(captions), 4), limit=len(captions),
                 sound=sound and (sound.waveforms[0], sound.rate))


def parse(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export_dir", type=Path)
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    parser.add_argument("--out", type=Path, required=True, help=f"one of {', '.join(FORMATS)}")
    parser.add_argument("--latents", type=Path, help="also write the latents and text embeddings here")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, help="an Euler role: its step count; a few-step student: its first K steps")
    parser.add_argument("--fps", type=int, default=8)
    parser.add_argument("--model", help="pipeline folder with text_encoder/, tokenizer/, vae/")
    parser.add_argument("--negative-prompt", help="the unconditional prompt (default: the family's)")
    parser.add_argument("--text-embeds", type=Path)
    parser.add_argument("--lora", action="store_true", help="apply the exported LoRA to its base network")
    parser.add_argument("--base", help="the LoRA's base network (default: the one it was trained on)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    problem = None
    if not (args.export_dir / "distill.json").is_file():
        problem = f"{args.export_dir} is not an exported role (no distill.json)"
    elif args.out.suffix not in FORMATS:
        problem = f"--out {args.out}: the file type must be one of {', '.join(FORMATS)}"
    elif bool(args.prompt) == bool(args.text_embeds):
        problem = "give --prompt (repeatable) or --text-embeds FILE"
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        adapter, role, sampler = load_exported(args.export_dir, args.lora, args.base, args.model)
        sampler = with_steps(sampler, adapter, args.steps)
        if args.prompt:
            prompts = [p for p in args.prompt for _ in args.seeds]
            text, uncond = encode_prompts(adapter, prompts, args.negative_prompt)
        else:
            loaded = load_file(str(args.text_embeds))["text_embeds"].float()
            prompts = [f"{args.text_embeds.name}[{i}]" for i in range(len(loaded)) for _ in args.seeds]
            text = loaded.repeat_interleave(len(args.seeds), dim=0)
            uncond = torch.zeros_like(text)
        seeds = list(args.seeds) * (len(prompts) // len(args.seeds))
        latents = sample_latents(adapter, role, sampler, text, uncond, seeds)
        if args.latents or args.out.suffix == ".safetensors":
            save_file({"samples": latents.contiguous(), "text_embeds": text.contiguous()},
                      str(args.latents or args.out))
        if args.out.suffix != ".safetensors":
            with torch.no_grad():
                pixels = adapter.decode(latents)
                # one clip in an .mp4 carries its sound (LTX-2), at the video's own frame rate
                sound = adapter.decode_audio(latents) if args.out.suffix == ".mp4" and len(latents) == 1 else None
            write_video(pixels, args.out, [f"{p} (seed {s})" if len(args.seeds) > 1 else p
                                           for p, s in zip(prompts, seeds)], sound.fps if sound else args.fps, sound)
    except (ValueError, NotImplementedError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{latents.shape[0]} samples in {sampler.num_steps} steps -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
