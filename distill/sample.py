"""Sample from an exported role with the sampler its method gave it.

    python -m distill.sample EXPORT_DIR --out samples.safetensors [--num 4] [--seed 0]
        [--text-embeds FILE]   # safetensors with `text_embeds` [N, L, D]; default: random
        [--lora [--base PATH]] # a LoRA role: its base plus EXPORT_DIR/lora, not the merged transformer

Writes the sampled latents (`samples` [N, C, T, H, W]) and the text embeddings
used. Decoding to pixels is the adapter's job and comes with validation.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from distill.config.schema import ModelConfig, RoleConfig
from distill.models import build_adapter
from distill.roles import Role
from distill.sampling import Sampler


def load_exported(folder: Path, lora: bool = False, base=None):
    """(adapter, role, sampler) of an export folder; with `lora`, the base network
    (distill.json's, or `base`) with the exported adapters added."""
    info = json.loads((folder / "distill.json").read_text())
    cfg = ModelConfig(
        family=info["family"],
        path=str(folder),
        subfolder=info.get("subfolder", "transformer"),
        arch=info.get("arch", {}),
        shift=info["shift"],
        latent_shape=info["latent_shape"],
        text_len=info["text_len"],
        text_dim=info["text_dim"],
    )
    adapter = build_adapter(cfg)
    if lora:
        if not info.get("lora"):
            raise ValueError(f"{folder} was not trained with LoRA (distill.json has no lora entry)")
        module = adapter.load(base or info["lora"]["base"], seed=info["lora"]["seed"])
        module = adapter.load_lora(module, folder / info["lora"]["folder"])
    else:
        module = adapter.load(str(folder), seed=0)
    return adapter, Role("sampler", RoleConfig(), module.eval().requires_grad_(False)), Sampler.from_json(info["sampler"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export_dir", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--num", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--text-embeds", type=Path)
    parser.add_argument("--lora", action="store_true", help="apply the exported LoRA to its base network")
    parser.add_argument("--base", help="the LoRA's base network (default: the one it was trained on)")
    args = parser.parse_args(argv)
    if not (args.export_dir / "distill.json").is_file():
        print(f"error: {args.export_dir} is not an exported role (no distill.json)", file=sys.stderr)
        return 2
    adapter, role, sampler = load_exported(args.export_dir, args.lora, args.base)
    g = torch.Generator().manual_seed(args.seed)
    if args.text_embeds:
        text = load_file(str(args.text_embeds))["text_embeds"].float()
    else:
        text = torch.randn((args.num, adapter.cfg.text_len, adapter.cfg.text_dim), generator=g)
    uncond = torch.zeros_like(text)
    samples = sampler(adapter, role, text, uncond, lambda shape: torch.randn(shape, generator=g))
    save_file({"samples": samples.contiguous(), "text_embeds": text.contiguous()}, str(args.out))
    print(f"{samples.shape[0]} samples in {sampler.num_steps} steps -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
