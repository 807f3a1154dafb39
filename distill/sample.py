"""Sample from an exported role in its few steps.

    python -m distill.sample EXPORT_DIR --out samples.safetensors [--num 4] [--seed 0]
        [--text-embeds FILE]   # safetensors with `text_embeds` [N, L, D]; default: random

Writes the sampled latents (`samples` [N, C, T, H, W]) and the text embeddings
used. Decoding to pixels is the adapter's job and comes with validation.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from distill.config.schema import ModelConfig, ModelFamily, RoleConfig
from distill.models import build_adapter
from distill.roles import Role
from distill.sampling import sample


def load_exported(folder: Path):
    info = json.loads((folder / "distill.json").read_text())
    cfg = ModelConfig(
        family=ModelFamily(info["family"]),
        path=str(folder),
        shift=info["shift"],
        latent_shape=info["latent_shape"],
        text_len=info["text_len"],
        text_dim=info["text_dim"],
    )
    adapter = build_adapter(cfg)
    module = adapter.load_transformer(str(folder), seed=0).eval().requires_grad_(False)
    return adapter, Role("sampler", RoleConfig(), module), torch.tensor(info["sigmas"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export_dir", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--num", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--text-embeds", type=Path)
    args = parser.parse_args(argv)
    if not (args.export_dir / "distill.json").is_file():
        print(f"error: {args.export_dir} is not an exported role (no distill.json)", file=sys.stderr)
        return 2
    adapter, role, sigmas = load_exported(args.export_dir)
    g = torch.Generator().manual_seed(args.seed)
    if args.text_embeds:
        text = load_file(str(args.text_embeds))["text_embeds"].float()
    else:
        text = torch.randn((args.num, adapter.cfg.text_len, adapter.cfg.text_dim), generator=g)
    samples = sample(adapter, role, sigmas, text, lambda shape: torch.randn(shape, generator=g))
    save_file({"samples": samples.contiguous(), "text_embeds": text.contiguous()}, str(args.out))
    print(f"{samples.shape[0]} samples in {len(sigmas)} steps -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
