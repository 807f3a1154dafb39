"""The extension points: methods and model families, each registered by name.

A method is one class in distill/methods/ (its config class, roles, checks,
batch keys and samplers ride on it); a model family is one adapter class in
distill/models/. Both register themselves with the decorators below when
their module is imported; `load_entries` imports every module of those two
packages, so a new entry is one new file there (and its YAML);
entries outside this package are named in the DISTILL_PLUGINS environment
variable (comma-separated module names), which every rank and SLURM job
inherits:

    DISTILL_PLUGINS=my_lab.methods python launch.py hydra.searchpath=[file://my_lab/conf] method=mine
"""

import importlib
import os
import pkgutil
from typing import Dict

METHODS: Dict[str, type] = {}
FAMILIES: Dict[str, type] = {}

PLUGINS_VARIABLE = "DISTILL_PLUGINS"


def register_method(cls: type) -> type:
    METHODS[cls.config_class.name] = cls
    return cls


def register_family(cls: type) -> type:
    FAMILIES[cls.family] = cls
    return cls


BUILT_IN = ("distill.methods", "distill.models")


def load_entries() -> None:
    """Import every module of the built-in packages (a new method or family is
    just a new file there), then the plugins."""
    for package in BUILT_IN:
        for info in pkgutil.iter_modules(importlib.import_module(package).__path__):
            importlib.import_module(f"{package}.{info.name}")
    for name in filter(None, (n.strip() for n in os.environ.get(PLUGINS_VARIABLE, "").split(","))):
        importlib.import_module(name)


def _entry(table: Dict[str, type], name: str, key: str, kind: str) -> type:
    if name not in table:
        load_entries()
    if name not in table:
        raise KeyError(f"{key}={name}: no such {kind} (registered: {', '.join(sorted(table))})")
    return table[name]


def method_class(name: str) -> type:
    return _entry(METHODS, name, "method.name", "method")


def family_class(name: str) -> type:
    return _entry(FAMILIES, name, "model.family", "model family")
