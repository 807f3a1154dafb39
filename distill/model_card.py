"""README.md of an exported role: a Hugging Face model card that says how to run it.

Front matter as the Hub reads it (library_name, base_model, pipeline_tag, tags),
then the base model, the method and its numbers, the sampling steps and sigmas,
the diffusers lines that sample it, ComfyUI's core-node settings, the run's last
validation metrics and the hash of its training config."""

import hashlib
import json
import os
from pathlib import Path
from typing import Dict, List, Optional

from distill.registry import family_class
from distill.stock_scheduler import override_snippet

PROJECT = Path(__file__).resolve().parents[1]


def write_card(out: Path, config, role: str, sampler, stock, stock_schedule: bool,
               causal: bool, run_dir: Path) -> None:
    (out / "README.md").write_text(card_text(config, role, sampler, stock, stock_schedule, causal, run_dir))


def card_text(config, role, sampler, stock, stock_schedule, causal, run_dir) -> str:
    """`sampler`: the role's (a few-step student's listed sigmas, or the Euler ODE with
    guidance of a critic or finetuned model); `stock`: the family's StockPipeline, or None."""
    model, method = config.model, config.method
    base = _repo_id(model.path)
    sigmas, steps = list(sampler.sigmas), len(sampler.sigmas)
    guidance = getattr(sampler, "guidance_scale", None)  # Euler roles only
    deterministic = getattr(sampler, "deterministic", False)
    step = ("moves to the next sigma by the flow ODE's Euler step (deterministic)" if deterministic else
            "re-noises it to the next sigma")
    tag = family_class(model.family).task(model)
    front = ["---", "library_name: diffusers"] + ([f"base_model: {base}"] if base else []) + [
        f"pipeline_tag: {tag}", "tags:", "- distillation", "- few-step", f"- {method.name}", f"- {model.family}", "---"]
    listed = ", ".join(f"{s:.6g}" for s in sigmas)
    lines = [
        *front, "",
        f"# {role}: {f'{steps}-step ' if guidance is None else ''}{method.name} {role} of "
        f"{base or 'a local ' + model.family + ' model'}", "",
        f"- base model: {base or 'a local folder (not named here)'} ({model.family})",
        f"- method: {method.name}; student steps {list(getattr(method, 'student_steps', []))}, "
        f"teacher guidance {getattr(method, 'guidance_scale', None)}, trained {config.training.max_steps} steps",
        (f"- sampling: {steps} steps at sigmas [{listed}], guidance 1 (no classifier-free guidance), "
         f"each step predicts the clean latent and {step}" if guidance is None else
         f"- sampling: the flow-matching ODE by Euler steps ({steps} by default) with guidance {guidance}, "
         "as the base model samples"),
        f"- training config sha256: {config_hash(run_dir)}", "",
        "## Sampling", "",
    ]
    lines += _how_to_sample(stock, stock_schedule, causal, sigmas, guidance, deterministic)
    if stock is not None and stock.comfyui and not causal and guidance is None:
        comfy_sampler = '"euler" (the ODE step)' if deterministic else '"lcm" (predict x0, re-noise)'
        lines += ["", "## ComfyUI (core nodes)", "",
                  f"`ManualSigmas` \"{listed}, 0\", `KSamplerSelect` {comfy_sampler}, cfg 1, "
                  "`SamplerCustomAdvanced`. `comfyui_workflow.json` (text-to-video) holds these nodes; it loads "
                  "`single_file/transformer.safetensors` (written by `python -m distill.export RUN --single-file`, "
                  "Wan's original keys) from `models/diffusion_models/`; LoRA students also ship "
                  "`lora/comfyui_lora.safetensors` for ComfyUI's LoRA loader."]
    metrics = last_validation(run_dir)
    if metrics:
        lines += ["", "## Last validation", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" for k, v in sorted(metrics.items())]
    return "\n".join(lines) + "\n"


def _how_to_sample(stock, stock_schedule, causal, sigmas, guidance, deterministic=False) -> List[str]:
    """`stock`: the family's StockPipeline, or None."""
    if causal:
        return ["A block-causal student: it generates chunk by chunk over its KV cache, which no stock",
                "pipeline does. Sample it with `python -m distill.sample THIS_FOLDER --prompt \"...\" --out clip.mp4`."]
    if stock is None:
        return ["No stock pipeline (the model has no text encoder or VAE folder of its own). Sample it with",
                "`python -m distill.sample THIS_FOLDER --prompt \"...\" --out clip.gif`."]
    pipeline = stock.class_name
    lines = ["```python", "import torch", f"from diffusers import {pipeline}", "",
             f"pipe = {pipeline}.from_pretrained(\"THIS_FOLDER\", torch_dtype=torch.bfloat16).to(\"cuda\")"]
    if guidance is not None:
        call = f"prompt=prompt, num_inference_steps={len(sigmas)}, guidance_scale={guidance}"
        return [*lines, stock.output.format(call=call), "```"]
    if not stock_schedule:
        lines += ["# these sigmas are not a shift / shift_terminal warp of an even grid: give them by hand",
                  *override_snippet(sigmas, stochastic=not deterministic).splitlines()]
    extra = "".join(f", {key}={value!r}" for key, value in stock.few_step_kwargs.items())
    call = f"prompt=prompt, num_inference_steps={len(sigmas)}, guidance_scale=1.0{extra}"
    lines += [stock.output.format(call=call), "```"]
    if not deterministic:
        lines += ["The re-noising draws from torch's global generator (the pipeline's `generator` does not reach",
                  "the scheduler): seed it with `torch.manual_seed` for repeatable samples."]
    return lines


def config_hash(run_dir: Path) -> str:
    """sha256 of the training config: the run's config.yaml, or its newest checkpoint's copy."""
    saved = sorted(Path(run_dir).glob("checkpoint-*/config.yaml"), key=lambda p: int(p.parent.name.split("-")[-1])
                   if p.parent.name.split("-")[-1].isdigit() else -1)
    candidates = [Path(run_dir) / "config.yaml", *saved[-1:]]
    path = next((p for p in candidates if p.is_file()), None)
    return hashlib.sha256(path.read_bytes()).hexdigest() if path else "unknown"


def last_validation(run_dir: Path) -> Dict[str, float]:
    """The student's metrics of the run's last validation (val/... keys of metrics.jsonl)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    last = [r for r in records if any(k.startswith("val/") for k in r)][-1:]
    return {k[4:]: v for r in last for k, v in r.items() if k.startswith("val/") and isinstance(v, (int, float))}


def _repo_id(path: Optional[str]) -> Optional[str]:
    """A Hub repo id (owner/name), never a machine path nor a folder of this project."""
    if not path or os.path.isabs(path) or path.startswith(".") or path.count("/") != 1:
        return None
    if os.path.exists(path) or (PROJECT / path).exists():
        return None
    return path
