"""Benchmarks of durable-ai, printed as a markdown table: ``uv run python -m benchmarks`` (see docs/performance.md).

Benchmarks are grouped per backend. :data:`GROUPS` maps a group name to the module that defines it; the module
exposes ``GROUP`` (a :class:`Group`). Adding a backend is adding a module and a line here, for example
``"nats": "benchmarks.nats"`` and ``"ably": "benchmarks.ably"``. Group modules are imported only when selected,
so a group whose optional dependencies are missing does not stop the others.
"""

from __future__ import annotations

import importlib

from ._harness import Benchmark, BenchmarkError, Group, Report, Row, Sizes, Target

__all__ = ["GROUPS", "Benchmark", "BenchmarkError", "Group", "Report", "Row", "Sizes", "Target", "load_group"]

GROUPS: dict[str, str] = {
    "memory": "benchmarks.core",
    "nats": "benchmarks.nats",
    "ably": "benchmarks.ably",
}
"""Benchmark groups by name, in the order they run."""


def load_group(name: str) -> Group:
    """Import the module of group ``name`` and return its ``GROUP``."""
    try:
        module_name = GROUPS[name]
    except KeyError:
        raise ValueError(f"unknown benchmark group {name!r}; known groups: {', '.join(GROUPS)}") from None
    module = importlib.import_module(module_name)
    group = getattr(module, "GROUP", None)
    if not isinstance(group, Group):
        raise TypeError(f"{module_name} does not define GROUP: benchmarks.Group")
    return group
