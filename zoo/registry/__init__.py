"""The block catalogue and plugin loading. `get_registry()` loads plugins once per process."""

from __future__ import annotations

from zoo.registry.hookspecs import hookimpl, hookspec
from zoo.registry.plugins import PluginWarning, load_registry
from zoo.registry.registry import CORE_SLOTS, Entry, FieldInfo, PluginInfo, Registry, describe_config

_REGISTRY: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, loading built-ins and plugins on first use."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = load_registry()
    return _REGISTRY


def set_registry(registry: Registry | None) -> None:
    """Replace (or with None, forget) the process-wide registry; for tests and embedding."""
    global _REGISTRY
    _REGISTRY = registry


__all__ = [
    "CORE_SLOTS", "Entry", "FieldInfo", "PluginInfo", "PluginWarning", "Registry",
    "describe_config", "get_registry", "hookimpl", "hookspec", "load_registry", "set_registry",
]
