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

from zoo.errors import PluginError
from zoo.registry import hookspecs
from zoo.registry.registry import PluginInfo, Registry

BUILTINS = "builtins"


class PluginWarning(UserWarning):
    """A plugin was skipped because it failed; the rest of the registry works."""


def _strict() -> bool:
    return os.environ.get("ZOO_STRICT_PLUGINS", "") not in ("", "0")


def _zoo_version() -> str:
    from zoo import __version__

    return __version__


def _candidates() -> list[tuple[PluginInfo, object]]:
    """(info, entry point or module) for every plugin that should load, built-ins first."""
    allowed = {n.strip() for n in os.environ.get("ZOO_PLUGINS", "").split(",") if n.strip()}
    found: list[tuple[PluginInfo, object]] = [
        (PluginInfo(BUILTINS, "qsparse-zoo", _zoo_version()), "zoo.blocks")
    ]
    for ep in sorted(entry_points(group="zoo"), key=lambda e: e.name):
        if ep.name == BUILTINS and ep.value == "zoo.blocks":
            continue  # the installed copy of ourselves
        if allowed and ep.name not in allowed:
            continue
        dist = getattr(ep, "dist", None)
        info = PluginInfo(ep.name, dist.name if dist else "?", dist.version if dist else "?")
        found.append((info, ep))
    return found


def _fail(info: PluginInfo, what: str, err: BaseException) -> None:
    msg = f"zoo plugin {info.name!r} ({info.dist} {info.version}) {what}: {type(err).__name__}: {err}"
    if _strict():
        raise PluginError(msg) from err
    warnings.warn(msg + " -- skipped (set ZOO_STRICT_PLUGINS=1 to raise)", PluginWarning, stacklevel=3)


def load_registry(extra: list[tuple[str, ModuleType]] | None = None) -> Registry:
    """Build a fresh registry from built-ins, entry points, and `extra` (name, module) pairs."""
    registry = Registry()
    pm = pluggy.PluginManager("zoo")
    pm.add_hookspecs(hookspecs)
    todo = _candidates() + [(PluginInfo(n, "<local>", ""), m) for n, m in (extra or [])]
    for info, source in todo:
        try:
            if isinstance(source, str):
                module = importlib.import_module(source)
            elif isinstance(source, ModuleType):
                module = source
            else:
                module = source.load()
            pm.register(module, name=info.name)
        except Exception as err:  # a broken plugin must not take the others down
            if info.name == BUILTINS:
                raise
            _fail(info, "failed to load", err)
            continue
        impls = [i for i in pm.hook.zoo_register.get_hookimpls() if i.plugin_name == info.name]
        before = dict(registry.entries), dict(registry.slots)
        registry._current = info
        try:
            for impl in impls:
                impl.function(registry=registry)
        except PluginError as err:
            if "registered twice" in str(err):
                raise
            registry.entries, registry.slots = before
            _fail(info, "failed to register", err)
            continue
        except Exception as err:
            registry.entries, registry.slots = before
            if info.name == BUILTINS:
                raise
            _fail(info, "failed to register", err)
            continue
        finally:
            registry._current = PluginInfo("<direct>", "<direct>", "")
        registry.plugins[info.name] = info
    return registry
