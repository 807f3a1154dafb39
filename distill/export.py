"""Export trained roles from a checkpoint as diffusers-format folders.

    python -m distill.export RUN_OR_CHECKPOINT [--out DIR]

For each trainable role (and its EMA when kept) writes
`<out>/<role>[_ema]/transformer/` (config.json + safetensors, loadable with
`WanTransformer3DModel.from_pretrained(folder, subfolder="transformer")`),
`<out>/<role>/scheduler/scheduler_config.json` (FlowMatchEulerDiscreteScheduler
with the student's few-step sigmas under `few_step_sigmas`) and
`<out>/<role>/distill.json` (what `python -m distill.sample` needs).
"""

import argparse
import json
import sys
from pathlib import Path
from typing import List

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from distill.checkpoint import latest_checkpoint, load_role_weights
from distill.config.io import load_config
from distill.config.schema import Config, DMD2Config
from distill.models import build_adapter

DEFAULT_SAMPLING_STEPS = 50


def sampling_sigmas(config: Config, adapter) -> List[float]:
    """The sigmas a trained role samples with: the student's listed steps for
    DMD2, an evenly spaced shifted schedule otherwise."""
    method = config.method
    if isinstance(method, DMD2Config):
        sigmas = torch.tensor(list(method.student_steps), dtype=torch.float32) / 1000
        return (adapter.shift_sigma(sigmas) if method.warp_steps else sigmas).tolist()
    return adapter.shift_sigma(torch.linspace(1.0, 0.0, DEFAULT_SAMPLING_STEPS + 1)[:-1]).tolist()


def export_role(checkpoint: Path, config: Config, role: str, out: Path, ema: bool = False) -> Path:
    adapter = build_adapter(config.model)
    module = adapter.empty_transformer(config.roles[role].path or config.model.path)
    state = load_role_weights(checkpoint, role, module.state_dict())
    if ema:
        params = {k: v for k, v in module.state_dict().items() if k in dict(module.named_parameters())}
        state.update(load_role_weights(checkpoint, role, params, ema=True))
    module.load_state_dict(state)
    module.save_pretrained(out / "transformer")
    sigmas = sampling_sigmas(config, adapter)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=config.model.shift)
    scheduler.register_to_config(few_step_sigmas=sigmas)
    scheduler.save_config(out / "scheduler")
    info = {
        "family": config.model.family.value,
        "shift": config.model.shift,
        "latent_shape": list(config.model.latent_shape),
        "text_len": config.model.text_len,
        "text_dim": config.model.text_dim,
        "sigmas": sigmas,
        "checkpoint": Path(checkpoint).name,  # no machine paths in what may be shipped
        "role": role,
        "ema": ema,
    }
    (out / "distill.json").write_text(json.dumps(info, indent=1))
    return out


def export_run(checkpoint: Path, out: Path) -> List[Path]:
    config = load_config(Path(checkpoint) / "config.yaml")
    written = []
    for name, role in config.roles.items():
        if role.trainable:
            written.append(export_role(checkpoint, config, name, Path(out) / name))
            if role.ema_decay is not None:
                written.append(export_role(checkpoint, config, name, Path(out) / f"{name}_ema", ema=True))
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", type=Path, help="a run folder (its newest checkpoint) or a checkpoint folder")
    parser.add_argument("--out", type=Path, help="output folder (default: <run>/export)")
    args = parser.parse_args(argv)
    checkpoint = args.path if (args.path / "trainer.json").is_file() else latest_checkpoint(args.path)
    if checkpoint is None:
        print(f"error: {args.path} holds no complete checkpoint", file=sys.stderr)
        return 2
    out = args.out or checkpoint.parent / "export"
    for folder in export_run(checkpoint, out):
        print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
