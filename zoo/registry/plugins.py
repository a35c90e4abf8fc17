"""Plugin loading: built-ins first, then the `zoo` entry points one by one.

Policies: a plugin that fails to import or register is skipped with one warning naming it
(``ZOO_STRICT_PLUGINS=1`` raises instead); ``ZOO_PLUGINS=a,b`` loads only those entry
points; two plugins claiming the same slot.kind is an error naming both distributions.
"""

from __future__ import annotations

import importlib
import os
import warnings
from importlib.metadata import entry_points
from types import ModuleType

import pluggy

from zoo._version import __version__
from zoo.errors import PluginCollisionError, PluginError, did_you_mean
from zoo.registry import hookspecs
from zoo.registry.registry import PluginInfo, Registry

# zoo's own blocks: a plugin like any other (pyproject declares it as the `zoo` entry point `builtins`),
# loaded first and always, from this module.
CORE, CORE_MODULE = PluginInfo("builtins", "qsparse-zoo", __version__, core=True), "zoo.builtins"


class PluginWarning(UserWarning):
    """A plugin was skipped because it failed; the rest of the registry works."""


def _strict() -> bool:
    return os.environ.get("ZOO_STRICT_PLUGINS", "") not in ("", "0")


def _entry_points() -> list:
    """The installed `zoo` entry points, sorted by name, without the core's own."""
    eps = entry_points(group="zoo")
    return sorted((ep for ep in eps if ep.value != CORE_MODULE), key=lambda e: e.name)


def _candidates(include_entry_points: bool) -> list[tuple[PluginInfo, object]]:
    """(info, entry point or module name) for every plugin that should load, built-ins first."""
    found: list[tuple[PluginInfo, object]] = [(CORE, CORE_MODULE)]
    if not include_entry_points:
        return found
    allowed = {n.strip() for n in os.environ.get("ZOO_PLUGINS", "").split(",") if n.strip()}
    installed = _entry_points()
    names = {ep.name for ep in installed}
    for name in sorted(allowed - names - {CORE.name}):
        warnings.warn(f"ZOO_PLUGINS names {name!r}, which is not installed{did_you_mean(name, names)}; "
                      f"installed plugins: {', '.join(sorted(names)) or 'none'}", PluginWarning, stacklevel=3)
    for ep in installed:
        if allowed and ep.name not in allowed:
            continue
        dist = getattr(ep, "dist", None)
        info = PluginInfo(ep.name, dist.name if dist else "?", dist.version if dist else "?")
        found.append((info, ep))
    return found


def _fail(registry: Registry, info: PluginInfo, what: str, err: BaseException) -> None:
    """Skip a broken plugin with one warning (or raise under ZOO_STRICT_PLUGINS=1)."""
    msg = f"zoo plugin {info.name!r} ({info.dist} {info.version}) {what}: {type(err).__name__}: {err}"
    if _strict():
        raise PluginError(msg) from err
    registry.failures[info.name] = (info, f"{what}: {type(err).__name__}: {err}")
    warnings.warn(msg + " -- skipped (set ZOO_STRICT_PLUGINS=1 to raise)", PluginWarning, stacklevel=3)


def _load_module(source: object) -> ModuleType:
    if isinstance(source, str):
        return importlib.import_module(source)
    if isinstance(source, ModuleType):
        return source
    return source.load()


def load_registry(extra: list[tuple[str, ModuleType]] | None = None, *,
                  include_entry_points: bool = True) -> Registry:
    """A fresh registry from built-ins, the `zoo` entry points (unless excluded) and `extra` (name, module).

    An `extra` module replaces an installed entry point of the same name or module (a plugin tested from
    its source tree while an older copy is installed)."""
    registry = Registry()
    pm = pluggy.PluginManager("zoo")
    pm.add_hookspecs(hookspecs)
    local = [(PluginInfo(n, "<local>", ""), m) for n, m in (extra or [])]
    shadowed = {info.name for info, _ in local} | {getattr(m, "__name__", None) for _, m in local}
    todo = [(info, source) for info, source in _candidates(include_entry_points)
            if not (info.name in shadowed or str(getattr(source, "value", "")).split(":")[0] in shadowed)] + local
    for info, source in todo:
        try:
            pm.register(_load_module(source), name=info.name)
        except Exception as err:  # a broken plugin must not take the others down
            if info.core:
                raise
            _fail(registry, info, "failed to load", err)
            continue
        impls = [i for i in pm.hook.zoo_register.get_hookimpls() if i.plugin_name == info.name]
        before = dict(registry.entries), dict(registry.slots), dict(registry.roles)
        registry._current = info
        try:
            for impl in impls:
                impl.function(registry=registry)
        except PluginCollisionError:
            raise
        except Exception as err:
            registry.entries, registry.slots, registry.roles = before
            if info.core:
                raise
            _fail(registry, info, "failed to register", err)
            continue
        finally:
            registry._current = PluginInfo("<direct>", "<direct>", "")
        registry.plugins[info.name] = info
    return registry
