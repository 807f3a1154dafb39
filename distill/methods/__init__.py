"""Training methods: the losses and the update schedule over the roles."""

from distill.methods.base import Method


def build_method(config, adapter, roles, device) -> Method:
    from distill.methods.dmd2 import DMD2
    from distill.methods.finetune import Finetune

    methods = {"dmd2": DMD2, "finetune": Finetune}
    return methods[config.method.name](config.method, adapter, roles, seed=config.seed, device=device)


__all__ = ["Method", "build_method"]
