"""Finding a diffusers model folder: a local path, or a Hugging Face repo id
whose snapshot is already in the local cache (nothing is downloaded)."""

import json
import os
from typing import Optional, Tuple


def resolve_model_folder(path: str, subfolder: str) -> Optional[str]:
    """The local folder holding `<subfolder>/config.json`, or None."""
    if os.path.isfile(os.path.join(path, subfolder, "config.json")):
        return path
    if os.path.isdir(path) or path.count("/") != 1:
        return None
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(path, f"{subfolder}/config.json")
    if isinstance(cached, str):
        return os.path.dirname(os.path.dirname(cached))
    return None


def read_component_config(path: str, subfolder: str, key: str) -> Tuple[Optional[dict], Optional[str]]:
    """(config.json of `<path>/<subfolder>`, None) or (None, an error naming `key`)."""
    folder = resolve_model_folder(path, subfolder)
    if folder is None:
        return None, (
            f"{key}={path}: no model there; tried {os.path.join(path, subfolder, 'config.json')} "
            "and the Hugging Face cache (download the weights first, or point the key at a diffusers folder)"
        )
    config_file = os.path.join(folder, subfolder, "config.json")
    try:
        with open(config_file) as f:
            return json.load(f), None
    except (OSError, json.JSONDecodeError) as err:
        return None, f"{key}={path}: cannot read {config_file}: {err}"
