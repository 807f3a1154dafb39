"""A resolved config written to, and read back from, a YAML file."""

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from distill.config.schema import Config
from distill.registry import family_class, load_entries, method_class


def config_text(config: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def save_config(config: Config, path: Path) -> None:
    Path(path).write_text(config_text(config))


def load_config_node(path: Path) -> DictConfig:
    """A saved config as a typed OmegaConf node (the schema with the file's values)."""
    load_entries()
    raw = OmegaConf.load(path)
    for role in (raw.get("roles") or {}).values():  # written before the modes existed: true/false
        if isinstance(role, DictConfig) and isinstance(role.get("activation_checkpointing"), bool):
            role.activation_checkpointing = "full" if role.activation_checkpointing else "none"
    schema = OmegaConf.structured(Config)
    schema.method = OmegaConf.structured(method_class(raw.method.name).config_class)
    family = OmegaConf.select(raw, "model.family")  # every saved config names it
    if family is not None:  # the family's own keys (configs saved before families owned them name the same)
        schema.model = OmegaConf.structured(family_class(family).config_class)
    return OmegaConf.merge(schema, raw)


def load_config(path: Path) -> Config:
    return OmegaConf.to_object(load_config_node(path))
