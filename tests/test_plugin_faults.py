"""Broken plugins: each failure is one message naming the plugin, and the rest of the registry keeps working.

Plugins are loaded together (one broken in each way, plus a good one) so the test also shows that
one plugin's failure does not take the others down.
"""

from __future__ import annotations

import sys
import types
import warnings
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import zoo
from tests.conftest import tiny
from tests.tiny import Times, tiny_run
from zoo.data import build_corpus
from zoo.errors import PluginError, RecipeError
from zoo.recipe import Invalid, param
from zoo.registry import PluginWarning
from zoo.train.loop import train


@dataclass(frozen=True)
class Plain:
    """no fields"""


@dataclass(frozen=True)
class Scale:
    """x * factor"""

    factor: float = param(2.0, "the multiplier", gt=0)


@dataclass
class NotFrozen:
    """a mutable config"""


class NotADataclass:
    """a plain class"""


@dataclass(frozen=True)
class SetField:
    """a field recipes cannot hold"""

    xs: set = param(frozenset(), "a set")


@dataclass(frozen=True)
class DanglingHint:
    """a type hint naming nothing"""

    x: Undefined = param(None, "x")  # noqa: F821


@dataclass(frozen=True)
class BuggyCheck:
    """check() has a bug"""

    a: int = param(1, "a")

    def check(self) -> None:
        raise AttributeError("self.b")


def module(name: str, register) -> types.ModuleType:
    """A plugin module whose zoo_register hook calls `register(registry)`."""
    m = types.ModuleType(name)
    m.zoo_register = zoo.hookimpl(lambda registry: register(registry))
    return m


def raise_(err: Exception):
    raise err


def activation(kind: str, config: type, factory=lambda cfg, ctx: nn.ReLU()):
    return lambda registry: registry.register("activation", kind, config, factory)


# Fail while loading: skipped with a warning naming them.
SKIPPED = {
    "raises_in_hook": lambda registry: raise_(RuntimeError("boom at import")),
    "half_registers": lambda registry: (registry.register("activation", "half_ok", Plain, lambda c, ctx: nn.ReLU()),
                                        raise_(ValueError("then fails"))),
    "not_a_dataclass": activation("plain_class", NotADataclass),
    "not_frozen": activation("mutable", NotFrozen),
    "set_field": activation("set_field", SetField),
    "dangling_hint": activation("dangling", DanglingHint),
    "unknown_slot": lambda registry: registry.register("actvation", "x", Plain, lambda c, ctx: nn.ReLU()),
    "field_named_kind": activation("kindfield", dataclass(frozen=True)(type("K", (), {"__annotations__": {"kind": str},
                                                                                   "kind": "x"}))),
    "factory_not_callable": activation("nocall", Plain, factory="relu"),
}
# Load fine, fail when a recipe uses them: PluginError naming them.
FAIL_ON_USE = {
    "build_raises": activation("build_raises", Plain, lambda cfg, ctx: raise_(KeyError("missing weight"))),
    "returns_none": activation("returns_none", Plain, lambda cfg, ctx: None),
    "wrong_signature": activation("wrong_signature", Plain, lambda: nn.ReLU()),
    "buggy_check": activation("buggy_check", BuggyCheck),
}
GOOD = {"good": activation("times", Scale, lambda cfg, ctx: Times(cfg.factor))}


@pytest.fixture
def broken_registry(plugin_registry):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        registry = plugin_registry(*[(n, module(n, r)) for n, r in {**SKIPPED, **FAIL_ON_USE, **GOOD}.items()])
    return registry, [str(w.message) for w in caught if issubclass(w.category, PluginWarning)]


def test_each_failing_plugin_is_skipped_with_one_warning_naming_it(broken_registry):
    registry, messages = broken_registry
    for name in SKIPPED:
        mine = [m for m in messages if f"zoo plugin {name!r}" in m]
        assert len(mine) == 1 and "\n" not in mine[0], (name, messages)
        assert name not in registry.plugins
    assert len(messages) == len(SKIPPED)
    assert ("activation", "half_ok") not in registry.entries  # rolled back with its plugin


def test_the_rest_of_the_registry_works(broken_registry):
    registry, _ = broken_registry
    assert {"good", "builtins", *FAIL_ON_USE} <= set(registry.plugins)
    model = zoo.build(tiny("model.ffn.activation={kind='times', factor=3.0}"))
    assert isinstance(model.blocks[0].ffn.act, Times) and model.blocks[0].ffn.act.factor == 3.0
    x = torch.randint(0, 256, (1, 5))
    assert torch.isfinite(model(x, x).loss)


@pytest.mark.parametrize("name", sorted(FAIL_ON_USE))
def test_plugin_failing_on_use_is_named_and_registry_survives(broken_registry, name):
    with pytest.raises(PluginError) as info:
        zoo.build(tiny(f"model.ffn.activation={{kind='{name}'}}"))
    msg = str(info.value)
    assert msg.startswith(f"plugin {name!r}") and "model.ffn.activation" in msg and "\n" not in msg, msg
    zoo.build(tiny("model.ffn.activation={kind='times'}"))  # the same registry still builds


def test_strict_mode_raises_naming_the_plugin(plugin_registry, monkeypatch):
    monkeypatch.setenv("ZOO_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match="'not_frozen'"):
        plugin_registry(("not_frozen", module("not_frozen", SKIPPED["not_frozen"])))


def test_cli_with_a_broken_plugin_still_runs(broken_registry, cli):
    """`zoo list` works and exits 0 although plugins failed (they were reported when loading)."""
    result = cli("list", "activation")
    assert result.code == 0 and "times" in result.out and "Traceback" not in result.err
    assert sys.modules.get("raises_in_hook") is None


@dataclass(frozen=True)
class NeedsPath:
    """a dataset that checks its path only when built"""

    path: str = param("", "where the text is")


def bad_dataset(cfg, source):
    raise Invalid("path", "no text there")


# Slots whose blocks are not modules, and their recipe keys: built through registry.build like the rest.
NOT_MODULES = {"dataset": "data.dataset", "tokenizer": "data.tokenizer", "optimizer": "optim",
               "schedule": "train.schedule"}


@pytest.mark.parametrize("slot", sorted(NOT_MODULES))
def test_every_slot_blames_the_plugin(plugin_registry, tmp_path, slot):
    """From where zoo builds them (data loading, the training loop's start), not only registry.build."""
    def register(registry):
        registry.register(slot, "broken", Plain, lambda cfg, *args: raise_(KeyError("a bug")))

    plugin_registry(("broken_" + slot, module("broken_" + slot, register)))
    key = NOT_MODULES[slot]
    recipe = tiny_run(tmp_path, **{key.replace(".", "__"): {"kind": "broken"}, "train__steps": 1})
    with pytest.raises(PluginError) as info:
        train(recipe, tmp_path / "run", progress=False)
    msg = str(info.value)
    assert msg.startswith(f"plugin 'broken_{slot}'") and f"building {slot}.broken at {key} failed: KeyError" in msg


def test_invalid_from_a_dataset_factory_is_a_recipe_error(plugin_registry):
    plugin_registry(("lazy", module("lazy", lambda r: r.register("dataset", "lazy", NeedsPath, bad_dataset))))
    with pytest.raises(RecipeError) as info:
        build_corpus(tiny("data.dataset={kind='lazy'}"))
    assert info.value.path == "data.dataset.path" and info.value.reason == "no text there"
    assert info.value.file.endswith("dense.toml")


def test_roles_belong_to_the_registry(plugin_registry):
    """A plugin's role exists in the registry that loaded it, and nowhere else (no process-wide state)."""
    with_role = plugin_registry(("roles", module("roles", lambda r: r.add_role("gate_only", parent="up_gate"))))
    assert with_role.roles["gate_only"] == "up_gate"
    spec = tiny("model.weights.roles.gate_only={dtype='float16'}").model.weights
    assert spec.for_role("gate_only").config.dtype == "float16" and spec.for_role("up_gate") is spec
    assert "gate_only" not in zoo.registry.load_registry(include_entry_points=False).roles
    plugin_registry()  # built-ins alone: the role is unknown again
    with pytest.raises(RecipeError, match="unknown role"):
        tiny("model.weights.roles.gate_only={dtype='float16'}")


def test_a_failing_plugin_takes_its_roles_with_it(plugin_registry):
    def half(registry):
        registry.add_role("half_role", parent="down")
        raise RuntimeError("then fails")

    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        registry = plugin_registry(("half", module("half", half)))
    assert "half_role" not in registry.roles and "half" in registry.failures


def test_a_role_needs_a_known_parent():
    registry = zoo.registry.Registry()
    with pytest.raises(PluginError, match="unknown parent 'dwon'.*did you mean \"down\""):
        registry.add_role("x", parent="dwon")
