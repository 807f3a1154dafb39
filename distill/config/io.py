"""A resolved config written to, and read back from, a YAML file."""

from pathlib import Path

from omegaconf import OmegaConf

from distill.config.schema import METHOD_SCHEMAS, Config


def save_config(config: Config, path: Path) -> None:
    Path(path).write_text(OmegaConf.to_yaml(OmegaConf.structured(config)))


def load_config(path: Path) -> Config:
    raw = OmegaConf.load(path)
    schema = OmegaConf.structured(Config)
    schema.method = OmegaConf.structured(METHOD_SCHEMAS[raw.method.name])
    return OmegaConf.to_object(OmegaConf.merge(schema, raw))
