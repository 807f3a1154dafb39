"""Model families: one adapter class each, all speaking flow matching.

A new family is one file here (an adapter registered with `register_family`,
its config class beside it) and a YAML in conf/model/ that names that class
first (`defaults: [/schema/model@_here_: NAME, _self_]`).
"""

import json
from pathlib import Path

from distill.config.schema import ModelConfig
from distill.models.flow_matching import FlowMatchingAdapter
from distill.registry import FAMILIES, family_class, load_entries


def build_adapter(cfg: ModelConfig) -> FlowMatchingAdapter:
    return family_class(cfg.family)(cfg)


def family_of_folder(folder: Path) -> str:
    """The registered family whose classes a diffusers folder's transformer/ or vae/
    config.json names (what `--family` defaults to), or ValueError naming what was read."""
    load_entries()
    named = []
    for part in ("transformer", "vae"):
        config = Path(folder) / part / "config.json"
        if config.is_file():
            named.append(json.loads(config.read_text()).get("_class_name"))
    for name, family in FAMILIES.items():
        if set(named) & set(family.folder_classes):
            return name
    raise ValueError(f"{folder}: no registered model family serves {named or 'it (no transformer/ or vae/ config.json)'}"
                     f"; name one with --family ({', '.join(sorted(FAMILIES))})")


__all__ = ["FlowMatchingAdapter", "build_adapter"]
