"""An exported role as a folder that stock diffusers loads unchanged.

`scheduler/` always: for a few-step role, a FlowMatchEulerDiscreteScheduler whose
plain `set_timesteps(N)` gives the role's sigmas where the list is representable
(distill/stock_scheduler.py), with `stochastic_sampling` (predict x0, re-noise; off for a deterministic student);
the written file is loaded back and checked. Where the family names a stock
pipeline (`FlowMatchingAdapter.stock_pipeline`), also `model_index.json` and the
parts of the model folder the run read (text encoder, tokenizer, VAE, image
encoder), linked or copied, so that `WanPipeline.from_pretrained(EXPORT)` runs.
"""

import inspect
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

from distill.models.flow_matching import StockPipeline
from distill.models.folders import resolve_model_folder
from distill.sampling import EulerSampler, Sampler
from distill.stock_scheduler import TOLERANCE, scheduler_config


class ExportError(ValueError):
    """An export that cannot be written; the message names the missing part."""


def write_scheduler(folder: Path, sampler: Sampler, adapter) -> bool:
    """The role's scheduler config, only keys diffusers knows (the sigmas themselves are in
    distill.json); True when the family's stock pipeline samples them unchanged."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    grid = adapter.sigma_grid
    if isinstance(sampler, EulerSampler):  # the base model's own sampler: its shift, deterministic steps
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, **adapter.euler_scheduler())
        stock = False
    else:
        stochastic = not getattr(sampler, "deterministic", False)  # re-noise, or step the ODE
        fitted = scheduler_config(list(sampler.sigmas), stochastic=stochastic, grid=grid)
        stock = fitted is not None
        # not representable: shift 1 leaves sigmas given by hand as they are (the card's override)
        scheduler = FlowMatchEulerDiscreteScheduler(**(fitted or {"shift": 1.0, "stochastic_sampling": stochastic}))
    scheduler.save_config(folder)
    if stock:
        check_scheduler(folder, list(sampler.sigmas), grid)
    return stock


def check_scheduler(folder: Path, sigmas: List[float], grid: str = "train_min") -> None:
    """Build the scheduler from the written file, as a pipeline would, and compare."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder)
    if grid == "inverse_steps":  # as QwenImagePipeline and LTX2Pipeline call it
        n = len(sigmas)
        scheduler.set_timesteps(sigmas=[1 - i / n for i in range(n)])
    else:
        scheduler.set_timesteps(len(sigmas))
    got = scheduler.sigmas[:-1].tolist()
    if max(abs(a - b) for a, b in zip(got, sigmas)) > TOLERANCE:
        raise ExportError(f"{folder}: set_timesteps({len(sigmas)}) gives sigmas {got}, not the role's {sigmas}")


@dataclass
class PipelinePlan:
    """What a stock pipeline export writes: model_index.json, and the parts it places."""

    index: Dict
    parts: Dict[str, Path]  # part name -> its folder in the model folder the run read


def plan_pipeline(stock: StockPipeline, model_path: str, transformer_class: str) -> PipelinePlan:
    """model_index.json naming the stock class and the model folder's parts, checked
    before anything is written: a missing part is refused with its name."""
    source = _model_folder(model_path, stock.parts)
    known = _read_index(source)
    entries, parts = {}, {}
    for part in (*stock.parts, *stock.optional_parts):
        if not (source / part).is_dir():
            if part in stock.parts:
                raise ExportError(f"{source} has no {part}/: {stock.class_name} needs it (model.path={model_path})")
            entries[part] = [None, None]
            continue
        entries[part] = known.get(part) or component_class(source / part, stock.class_name)
        parts[part] = source / part
    accepted = set(inspect.signature(_pipeline_class(stock.class_name)).parameters)
    for name in stock.transformers:
        if name not in accepted:
            raise ExportError(f"{stock.class_name} has no component {name!r} (model.subfolder)")
        entries[name] = ["diffusers", transformer_class]
    for name in ("transformer", "transformer_2"):
        if name in accepted:
            entries.setdefault(name, [None, None])
    entries["scheduler"] = ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    from diffusers import __version__

    index = {"_class_name": stock.class_name, "_diffusers_version": __version__, **dict(sorted(entries.items())),
             **stock.config}
    return PipelinePlan(index, parts)


def write_pipeline(out: Path, plan: PipelinePlan, parts_mode: str = "link") -> None:
    for part, src in plan.parts.items():
        _place(src, out / part, parts_mode)
    (out / "model_index.json").write_text(json.dumps(plan.index, indent=2) + "\n")


def component_class(folder: Path, pipeline: str) -> List[str]:
    """[library, class] of a saved component, from the file its library writes. A diffusers
    class that lives in the pipeline's own module (LTX-2's text connectors and vocoder) is
    declared by that module's name, as diffusers' loader looks it up there."""
    for name, key, library in (("tokenizer_config.json", "tokenizer_class", "transformers"),
                               ("preprocessor_config.json", "image_processor_type", "transformers"),
                               ("config.json", "_class_name", "diffusers"),
                               ("config.json", "architectures", "transformers")):
        path = folder / name
        if path.is_file():
            value = json.loads(path.read_text()).get(key)
            if value:
                value = value[0] if isinstance(value, list) else value
                return [_pipeline_module(pipeline, value) if library == "diffusers" else library, value]
    raise ExportError(f"{folder}: cannot tell its class (no tokenizer_config.json, preprocessor_config.json "
                      "or config.json naming one)")


def _model_folder(model_path: Optional[str], parts) -> Path:
    """The local model folder the run read (a path, or a repo id in the local cache)."""
    for part in parts:  # a repo id resolves through a part with a config.json (the VAE, the text encoder)
        folder = resolve_model_folder(model_path, part) if model_path else None
        if folder is not None:
            return Path(folder)
    if model_path and Path(model_path).is_dir():
        return Path(model_path)
    raise ExportError(f"model.path={model_path}: no model folder there, which a stock pipeline folder needs")


def _read_index(source: Path) -> dict:
    path = source / "model_index.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _pipeline_module(pipeline: str, class_name: str) -> str:
    """'diffusers' for a class diffusers exports, else the name of the pipeline's package
    (diffusers.pipelines.<name>) where the class is defined."""
    import importlib

    import diffusers

    if hasattr(diffusers, class_name):
        return "diffusers"
    package = _pipeline_class(pipeline).__module__.split(".")[2]
    return package if hasattr(importlib.import_module(f"diffusers.pipelines.{package}"), class_name) else "diffusers"


def _pipeline_class(name: str):
    import diffusers

    return getattr(diffusers, name)


def _place(src: Path, dst: Path, mode: str) -> None:
    """A part of the model folder in the export: a symbolic link where the filesystem
    allows one and `mode` is 'link', else a copy."""
    if dst.is_symlink() or dst.exists():
        shutil.rmtree(dst) if dst.is_dir() and not dst.is_symlink() else dst.unlink()
    if mode == "link":
        try:
            os.symlink(src.resolve(), dst, target_is_directory=True)
            return
        except OSError:
            pass
    shutil.copytree(src, dst)
