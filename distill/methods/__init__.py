"""Training methods: the losses and the update schedule over the roles.

A new method is one file here (a Method subclass registered with
`register_method`, with its config class) and one YAML in conf/method/.
"""

from distill.methods.base import Method
from distill.registry import method_class


def build_method(config, adapter, roles, device) -> Method:
    return method_class(config.method.name)(config.method, adapter, roles, seed=config.seed, device=device)


__all__ = ["Method", "build_method"]
