"""Model adapters: one per model family, all speaking flow matching."""

from distill.config.schema import ModelConfig
from distill.models.flow_matching import FlowMatchingAdapter


def build_adapter(cfg: ModelConfig) -> FlowMatchingAdapter:
    from distill.models.wan import WanAdapter

    adapters = {"wan": WanAdapter}
    return adapters[cfg.family.value](cfg)


__all__ = ["FlowMatchingAdapter", "build_adapter"]
