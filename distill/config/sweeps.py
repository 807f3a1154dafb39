"""Expose the YAML files in sweeps/ as the Hydra config group `sweep`.

Sweep definitions live beside the code, not under conf/, so they are read
here and stored in the ConfigStore: `python launch.py -m +sweep=NAME`.
"""

from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf


def register_sweeps(folder: Path) -> None:
    cs = ConfigStore.instance()
    for file in sorted(folder.glob("*.yaml")):
        cs.store(group="sweep", name=file.stem, node=OmegaConf.load(file), package="_global_")
