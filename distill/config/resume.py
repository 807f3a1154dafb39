"""Continuing a run in its own folder: `python launch.py hydra.run.dir=RUN [overrides]`.

A folder that holds a run (its `config.yaml`) continues with that run's own
config. Hydra composes the run's saved overrides followed by this launch's;
the keys this launch changes (against the saved overrides alone) are applied
to the saved config. Only what may change without invalidating the
checkpoint is accepted: the length, cadences, validation, logging and where
it runs (at the same number of ranks). Anything else is refused, naming each
key with both values, before anything in RUN is written.

Each launch's own overrides are appended to `RUN/.hydra/launches.yaml`, and
`RUN/.hydra/overrides.yaml` holds the list that composes the run's config
now (the original overrides, each updated by later launches).
"""

from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from omegaconf import DictConfig, OmegaConf

from distill.config.io import load_config_node
from distill.config.schema import Config
from distill.config.validate import ConfigError, validate, world_size

CONFIG_FILE = "config.yaml"
OVERRIDES_FILE = Path(".hydra") / "overrides.yaml"
LAUNCHES_FILE = Path(".hydra") / "launches.yaml"

# keys a continued run may change: prefixes end with a dot
MAY_CHANGE = (
    "training.max_steps", "training.log_every", "training.export_at_end", "training.device",
    "training.torch_threads", "training.collective_timeout_s",
    "checkpoint.every", "checkpoint.keep_last", "checkpoint.resume_from",
    "validation.", "logger.", "launcher.",
)


def run_dir_argument(argv: List[str]) -> Optional[Path]:
    """RUN from `hydra.run.dir=RUN` on the command line, if given."""
    for arg in argv:
        if arg.startswith("hydra.run.dir="):
            return Path(arg.split("=", 1)[1])
    return None


def existing_run(argv: List[str]) -> Optional[Path]:
    """The run folder a single-run launch continues, or None for a new run."""
    if "-m" in argv or "--multirun" in argv:
        return None
    run = run_dir_argument(argv)
    return run if run is not None and (run / CONFIG_FILE).is_file() else None


def override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def saved_overrides(run: Path) -> List[str]:
    file = run / OVERRIDES_FILE
    return list(OmegaConf.load(file)) if file.is_file() else []


def merge_overrides(saved: List[str], new: List[str]) -> List[str]:
    """The saved overrides, each replaced by this launch's override of the same key, then the new keys."""
    new_by_key = {override_key(o): o for o in new}
    merged = [new_by_key.pop(override_key(o), o) for o in saved]
    return merged + list(new_by_key.values())


def continue_argv(argv: List[str], run: Path) -> List[str]:
    """The command line that composes the continued run: its saved overrides, then this launch's."""
    hydra_args = [a for a in argv if a.startswith("hydra.") or a.startswith("-")]
    task_args = [a for a in argv if a not in hydra_args]
    return hydra_args + merge_overrides(saved_overrides(run), task_args)


def flatten(node, prefix: str = "") -> Dict[str, object]:
    if isinstance(node, dict):
        flat = {}
        for key, value in node.items():
            flat.update(flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: node}


def changes(base: DictConfig, new: DictConfig) -> Dict[str, object]:
    """key -> new value, for every leaf this launch's overrides changed."""
    before = flatten(OmegaConf.to_container(base, resolve=True))
    after = flatten(OmegaConf.to_container(new, resolve=True))
    return {key: after.get(key) for key in sorted(set(before) | set(after)) if before.get(key) != after.get(key)}


def may_change(key: str) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in MAY_CHANGE)


def continued_config(run: Path, base: DictConfig, new: DictConfig) -> Tuple[Config, Dict[str, object]]:
    """The saved config of `run` with this launch's changes, validated; ConfigError
    naming every key that may not change."""
    saved = load_config_node(run / CONFIG_FILE)
    changed = changes(base, new)
    had = flatten(OmegaConf.to_container(saved, resolve=True))
    refused = [key for key in changed if not may_change(key)]
    updated = saved.copy()
    for key, value in changed.items():
        if key not in refused:
            OmegaConf.update(updated, key, value, merge=False)
    config = validate(updated)
    previous = OmegaConf.to_object(saved)
    if world_size(config.launcher) != world_size(previous.launcher):
        refused += [key for key in changed if key.startswith("launcher.")]
    if refused:
        lines = [f"  {key}: the run has {had.get(key)!r}, this launch gives {changed[key]!r}" for key in refused]
        raise ConfigError(
            f"{run} holds a run; continuing it cannot change:\n" + "\n".join(lines)
            + "\n(the length, cadences, validation, logger and launcher at the same number of ranks may change; "
            "to train on from its checkpoint with other settings, start a new run folder with "
            "checkpoint.resume_from=<checkpoint folder>)"
        )
    return config, changed


def record_launch(run: Path, overrides: List[str], this_launch: List[str]) -> None:
    """Write the overrides that compose the run's config now, and append this launch to the history."""
    folder = run / OVERRIDES_FILE.parent
    folder.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(list(overrides)), run / OVERRIDES_FILE)
    history = list(OmegaConf.load(run / LAUNCHES_FILE)) if (run / LAUNCHES_FILE).is_file() else []
    history.append({"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "argv": list(this_launch)})
    OmegaConf.save(OmegaConf.create(history), run / LAUNCHES_FILE)
