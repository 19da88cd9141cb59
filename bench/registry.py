"""The algorithm registry: the `bench.algorithms` entry-point group. The built-ins are this distribution's own
entry points (pyproject.toml), so a third party adds an algorithm exactly like them: one module and an entry
point, then `pip install`."""
from __future__ import annotations

import warnings
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

from bench.errors import UserError

if TYPE_CHECKING:
    from algorithms.base import Algorithm

ENTRY_POINT_GROUP = "bench.algorithms"
DISTRIBUTION = "mhpfl-bench"  # the built-ins are this distribution's own entry points (pyproject.toml)

_REGISTRY: dict[str, type["Algorithm"]] = {}
_loaded = False


def canonical_algorithm_name(name: str) -> str:
    """Case-insensitive and forgiving of hyphens/underscores: 'LG-FedAvg' -> 'lgfedavg'."""
    return name.lower().replace("-", "").replace("_", "")


def register(cls: type["Algorithm"]) -> type["Algorithm"]:
    """Add an algorithm class by hand (tests, notebooks); installed algorithms come from entry points."""
    _REGISTRY[canonical_algorithm_name(cls.name)] = cls
    return cls


def _load() -> None:
    """Every algorithm of the `bench.algorithms` entry-point group: the built-ins (this distribution's own
    entry points) and third-party plugins alike. A broken plugin warns; a broken built-in raises."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    points = list(entry_points(group=ENTRY_POINT_GROUP))
    if not any(ep.dist is not None and ep.dist.name == DISTRIBUTION for ep in points):
        raise UserError(f"the built-in algorithms are not registered: install the package (pip install -e .) "
                        f"so that its {ENTRY_POINT_GROUP!r} entry points exist")
    for ep in points:
        builtin = ep.dist is not None and ep.dist.name == DISTRIBUTION
        try:
            cls = ep.load()
        except Exception as err:  # a broken plugin must not take the built-ins down
            if builtin:
                raise
            warnings.warn(f"algorithm plugin {ep.name!r} ({ep.value}) failed to import: {err}", stacklevel=2)
            continue
        if canonical_algorithm_name(cls.name) not in _REGISTRY:
            register(cls)


def algorithms() -> dict[str, type["Algorithm"]]:
    _load()
    return dict(sorted(_REGISTRY.items(), key=lambda item: (item[1].table_order, item[0])))


def find_algorithm(name: str) -> type["Algorithm"] | None:
    """The registered class of `name` (any spelling resolve_algorithms accepts), or None."""
    return algorithms().get(canonical_algorithm_name(name))


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
