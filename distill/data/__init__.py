"""Batch sources for the trainer."""

from distill.data.synthetic import SyntheticLatents


def build_data(config, rank: int = 0, world_size: int = 1):
    if config.data.name == "synthetic":
        return SyntheticLatents(config.model, config.data, seed=config.seed, rank=rank, world_size=world_size)
    raise ValueError(f"data.name={config.data.name}: allowed values are synthetic")


__all__ = ["SyntheticLatents", "build_data"]
