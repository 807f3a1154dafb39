"""Model families: one adapter class each, all speaking flow matching.

A new family is one file here (an adapter registered with
`register_family`) and one YAML in conf/model/ naming it in `family`.
"""

from distill.config.schema import ModelConfig
from distill.models.flow_matching import FlowMatchingAdapter
from distill.registry import family_class


def build_adapter(cfg: ModelConfig) -> FlowMatchingAdapter:
    return family_class(cfg.family)(cfg)


__all__ = ["FlowMatchingAdapter", "build_adapter"]
