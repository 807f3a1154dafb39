"""Export trained roles from a checkpoint as diffusers-format folders.

    python -m distill.export RUN_OR_CHECKPOINT [--out DIR] [--parts link|copy] [--single-file]

For each trainable role (and its EMA when kept) writes `<out>/<role>[_ema]/`:
  transformer/     the full network in the model family's diffusers layout
                   (`WanTransformer3DModel.from_pretrained(folder, subfolder="transformer")`);
                   for a LoRA role, the base with the adapters merged in
  transformer_2/   two experts (Wan2.2 A14B): the low-noise one, beside the high-noise
                   one in transformer/, both whether trained or kept as loaded
  lora/            LoRA roles only: the adapters as diffusers LoRA weights
                   (`WanPipeline.load_lora_weights(<out>/<role>/lora)`), and as
                   comfyui_lora.safetensors in the original-key layout with alpha
                   tensors (ComfyUI's LoRA loader; diffusers reads it too)
  single_file/     with --single-file: each network as one file in the original
                   Wan key layout (ComfyUI's diffusion-model loader; from_single_file)
  scheduler/       FlowMatchEulerDiscreteScheduler config: for a few-step role, the
                   shift / shift_terminal whose plain set_timesteps(N) gives its sigmas
                   (where representable) with stochastic_sampling
  model_index.json a stock pipeline class (WanPipeline, WanImageToVideoPipeline) where the
  tokenizer/ ...   family has one and the role is not block-causal, with the model
                   folder's text encoder, tokenizer, VAE (and image encoder) linked or
                   copied beside it: `WanPipeline.from_pretrained(<out>/<role>)` samples it
  comfyui_workflow.json  a ComfyUI workflow (API format, core nodes: ManualSigmas with the
                   role's sigmas, the lcm sampler, cfg 1) for a text-to-video Wan student
  README.md        a Hugging Face model card: how to sample it, its steps and sigmas,
                   the last validation metrics, the training config's hash
  distill.json     what `python -m distill.sample` needs (shapes, sampler, LoRA base)
"""

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

import torch
from omegaconf import OmegaConf

from distill.checkpoint import load_tensors, read_complete
from distill.config.io import load_config
from distill.config.schema import Config
from distill.lora import merge_lora
from distill.model_card import config_hash, write_card
from distill.models import build_adapter
from distill.pipeline_folder import ExportError, plan_pipeline, write_pipeline, write_scheduler
from distill.registry import method_class
from distill.roles import convert, weights_path
from distill.sampling import EulerSampler

LORA_FOLDER = "lora"
SINGLE_FILE_FOLDER = "single_file"
WORKFLOW_FILE = "comfyui_workflow.json"


def trained_module(checkpoint: Path, config: Config, adapter, role: str, ema: bool = False) -> torch.nn.Module:
    """The role's network with the checkpoint's trained weights (or their EMA), unsharded.

    A full-weight role starts from the architecture alone; a LoRA role from its
    base weights, converted as in training, so that only the adapters are read."""
    cfg = config.roles[role]
    path = weights_path(config, role)
    partial = cfg.lora.rank > 0 or adapter.trains_part()  # what it did not train comes from its weights
    module = convert(adapter.load(path, config.seed) if partial else adapter.empty(path), cfg, adapter, config.seed)
    params = dict(module.named_parameters())
    names = [n for n, p in params.items() if p.requires_grad]
    kind = "ema" if ema else "model"
    template = {f"role.{role}/{kind}/{n}": params[n].detach() for n in names}
    loaded = load_tensors(checkpoint, template)
    with torch.no_grad():
        for n in names:
            params[n].copy_(loaded[f"role.{role}/{kind}/{n}"])
    return module.eval().requires_grad_(False)


def export_role(checkpoint: Path, config: Config, role: str, out: Path, ema: bool = False,
                parts_mode: str = "link", single_file: bool = False) -> Path:
    adapter = build_adapter(config.model)
    cfg = config.roles[role]
    stock = None if cfg.causal else adapter.stock_pipeline()  # no stock pipeline generates chunk by chunk
    plan = stock and plan_pipeline(stock, config.model.path, adapter.model_class.__name__)  # refused before writing
    module = trained_module(checkpoint, config, adapter, role, ema)
    lora_info = None
    if cfg.lora.rank > 0:
        adapter.save_lora(module, out / LORA_FOLDER)
        lora_info = {"base": weights_path(config, role), "seed": config.seed, "rank": cfg.lora.rank,
                     "folder": LORA_FOLDER}
        merge_lora(module)
    adapter.save(module, out)
    if single_file:
        adapter.save_single_file(module, out / SINGLE_FILE_FOLDER)
    sampler = method_class(config.method.name).sampler(config.method, adapter, role)
    stock_schedule = write_stock_parts(out, adapter, cfg, sampler, plan, parts_mode)
    info = {
        **model_keys(config.model, causal=cfg.causal),
        # where the text encoder and VAE are read from (null when the built-in ones serve)
        "model_path": model_folder(config.model),
        "sampler": sampler.to_json(),
        "lora": lora_info,
        "checkpoint": Path(checkpoint).name,  # no machine paths in what may be shipped
        "role": role,
        "ema": ema,
        "config_sha256": config_hash(Path(checkpoint).parent),  # the model card's, for evaluation records
    }
    (out / "distill.json").write_text(json.dumps(info, indent=1))
    write_card(out, config, role, sampler, stock, stock_schedule, cfg.causal,
               Path(checkpoint).parent)
    return out


def write_stock_parts(out: Path, adapter, role_cfg, sampler, plan, parts_mode: str) -> bool:
    """The scheduler config, and where the family has them the stock pipeline folder and
    the ComfyUI workflow; True when a plain `set_timesteps(N)` samples the role's sigmas."""
    stock_schedule = write_scheduler(out / "scheduler", sampler, adapter)
    few_step = not isinstance(sampler, EulerSampler)
    if plan is not None:
        write_pipeline(out, plan, parts_mode)
        if few_step and not stock_schedule:
            print(f"{out}: the sigmas {list(sampler.sigmas)} are not representable by a stock scheduler config; "
                  "README.md gives the lines that set them", file=sys.stderr)
    if few_step and not role_cfg.causal:
        graph = adapter.comfyui_workflow(list(sampler.sigmas), f"{adapter.cfg.subfolder}.safetensors",
                                         getattr(sampler, "deterministic", False))
        if graph is not None:  # it loads the --single-file export by that name
            (out / WORKFLOW_FILE).write_text(json.dumps(graph, indent=1) + "\n")
    return stock_schedule


def model_keys(model, causal: bool) -> dict:
    """Every model.* key but the path, as plain values (the family's own keys too, e.g.
    Wan's boundary_ratio and image_condition): what `distill.sample` rebuilds the model from."""
    keys = OmegaConf.to_container(OmegaConf.structured(model), resolve=True, enum_to_str=True)
    keys.pop("path")
    if not causal:
        keys["chunk_frames"] = None  # only a block-causal network generates chunk by chunk
    return keys


def model_folder(model) -> str:
    """The pipeline folder sampling reads the text encoder and VAE from, or None
    when neither is needed (hash text encoder, identity VAE): no machine paths
    in what may be shipped."""
    if model.text_encoder == "hash" and model.vae == "identity":
        return None
    return model.path


def export_run(checkpoint: Path, out: Path, parts_mode: Optional[str] = None, single_file: bool = False) -> List[Path]:
    config = load_config(Path(checkpoint) / "config.yaml")
    parts_mode = parts_mode or config.training.export_parts.value
    written = []
    for name, role in config.roles.items():
        if role.trainable:
            written.append(export_role(checkpoint, config, name, Path(out) / name, parts_mode=parts_mode,
                                       single_file=single_file))
            if role.ema_decay is not None:
                written.append(export_role(checkpoint, config, name, Path(out) / f"{name}_ema", ema=True,
                                           parts_mode=parts_mode, single_file=single_file))
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", type=Path, help="a run folder (its newest checkpoint) or a checkpoint folder")
    parser.add_argument("--out", type=Path, help="output folder (default: <run>/export)")
    parser.add_argument("--parts", choices=["link", "copy"],
                        help="the model folder's text encoder, tokenizer and VAE: linked or copied "
                             "(default: the run's training.export_parts)")
    parser.add_argument("--single-file", action="store_true",
                        help="also write each network as one file in the family's original key layout "
                             "(<role>/single_file/transformer.safetensors: ComfyUI's diffusion-model loader)")
    args = parser.parse_args(argv)
    checkpoint = read_complete(args.path)
    if checkpoint is None:
        print(f"error: {args.path} holds no complete checkpoint", file=sys.stderr)
        return 2
    out = args.out or checkpoint.parent / "export"
    try:
        folders = export_run(checkpoint, out, args.parts, args.single_file)
    except (ExportError, NotImplementedError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for folder in folders:
        print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
