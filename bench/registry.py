"""The algorithm registry: a decorator for built-ins, and the `bench.algorithms` entry-point group so a
third party adds an algorithm with `pip install` alone."""
from __future__ import annotations

import importlib
import warnings
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

from bench.errors import UserError

if TYPE_CHECKING:
    from algorithms.base import Algorithm

ENTRY_POINT_GROUP = "bench.algorithms"
BUILTIN_MODULES = ("standalone", "fedavg", "pfedlora", "feddistill", "fml", "fedkd", "lgfedavg", "fedgh",
                   "fedapen")

_REGISTRY: dict[str, type["Algorithm"]] = {}
_loaded = False


def canonical_algorithm_name(name: str) -> str:
    """Case-insensitive and forgiving of hyphens/underscores: 'LG-FedAvg' -> 'lgfedavg'."""
    return name.lower().replace("-", "").replace("_", "")


def register(cls: type["Algorithm"]) -> type["Algorithm"]:
    """Class decorator for algorithms; the key is the canonical form of `cls.name`."""
    _REGISTRY[canonical_algorithm_name(cls.name)] = cls
    return cls


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in BUILTIN_MODULES:
        try:
            importlib.import_module(f"algorithms.{module}")
        except ModuleNotFoundError as err:
            if err.name != f"algorithms.{module}":
                raise
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = ep.load()
        except Exception as err:  # a broken plugin must not take the built-ins down
            warnings.warn(f"algorithm plugin {ep.name!r} ({ep.value}) failed to import: {err}", stacklevel=2)
            continue
        if canonical_algorithm_name(cls.name) not in _REGISTRY:
            register(cls)


def algorithms() -> dict[str, type["Algorithm"]]:
    _load()
    return dict(sorted(_REGISTRY.items()))


def is_algorithm(name: str) -> bool:
    return canonical_algorithm_name(name) in algorithms()


def resolve_algorithms(names: list[str]) -> list[type["Algorithm"]]:
    known = algorithms()
    resolved = []
    for name in names:
        key = canonical_algorithm_name(name)
        if key not in known:
            raise UserError(f"unknown algorithm {name!r}; valid: {', '.join(cls.name for cls in known.values())}")
        resolved.append(known[key])
    return resolved
