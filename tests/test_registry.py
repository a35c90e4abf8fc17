"""The registry: registration checks, plugin loading policies (failure, strict, ZOO_PLUGINS, collisions)."""

import re
import sys
import types
import warnings
from dataclasses import dataclass

import pytest

import zoo
import zoo.registry.plugins as plugins
from tests.tiny import Times
from zoo.errors import PluginCollisionError, PluginError, UnknownNameError
from zoo.recipe import param
from zoo.registry import PluginWarning, Registry, describe_config, load_registry


@dataclass(frozen=True)
class TwiceConfig:
    """x * factor"""

    factor: float = param(2.0, "the multiplier", gt=0)


def plugin_module(name: str, register=None, fail_import: bool = False) -> types.ModuleType:
    """A module with a zoo_register hook, as an entry point would load it."""
    module = types.ModuleType(name)

    def zoo_register(registry):
        (register or (lambda r: r.register("activation", "twice", TwiceConfig, lambda c, ctx: Times(c.factor))))(
            registry)

    module.zoo_register = zoo.hookimpl(zoo_register)
    return module


class FakeDist:
    def __init__(self, name, version):
        self.name, self.version = name, version


class FakeEntryPoint:
    """Quacks like importlib.metadata.EntryPoint: name, value, dist, load()."""

    def __init__(self, name, dist, module=None, error=None):
        self.name, self.value, self.dist = name, f"{name}_module", FakeDist(dist, "1.2.3")
        self.module, self.error = module, error

    def load(self):
        if self.error:
            raise self.error
        return self.module


@pytest.fixture
def entry_points(monkeypatch):
    """`entry_points(ep, ...)`: make these the installed `zoo` entry points."""

    def install(*eps):
        monkeypatch.setattr(plugins, "entry_points", lambda group: list(eps) if group == "zoo" else [])

    monkeypatch.delenv("ZOO_PLUGINS", raising=False)
    monkeypatch.delenv("ZOO_STRICT_PLUGINS", raising=False)
    return install


def test_a_local_plugin_module_replaces_the_installed_copy(entry_points):
    installed = plugin_module("twice_module")
    entry_points(FakeEntryPoint("twice", "zoo-twice", installed))
    for name, module in (("twice", plugin_module("twice_plugin")), ("renamed", installed)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            registry = load_registry([(name, module)])
        assert registry.get("activation", "twice").plugin.dist == "<local>" and list(registry.plugins) == [
            "builtins", name]


def test_entry_point_plugin_loads_and_is_described(entry_points):
    entry_points(FakeEntryPoint("twice", "zoo-twice", plugin_module("twice_plugin")))
    registry = load_registry()
    entry = registry.get("activation", "twice")
    assert entry.plugin.name == "twice" and entry.plugin.dist == "zoo-twice" and entry.plugin.version == "1.2.3"
    assert entry.doc == "x * factor"
    assert [e.kind for e in registry.by_plugin("twice")] == ["twice"]
    assert list(registry.plugins) == ["builtins", "twice"]
    [f] = describe_config(entry.config)
    assert (f.name, f.type, f.default, f.doc, f.required, f.bounds) == ("factor", "float", 2.0, "the multiplier",
                                                                       False, "> 0")


def test_plugin_failing_at_import_warns_once_and_rest_work(entry_points):
    entry_points(FakeEntryPoint("broken", "zoo-broken", error=ImportError("No module named 'nonexistent'")),
                 FakeEntryPoint("twice", "zoo-twice", plugin_module("twice_plugin")))
    with pytest.warns(PluginWarning) as record:
        registry = load_registry()
    assert len(record) == 1
    msg = str(record[0].message)
    assert "'broken'" in msg and "zoo-broken 1.2.3" in msg and "No module named 'nonexistent'" in msg
    assert "ZOO_STRICT_PLUGINS=1" in msg
    assert registry.get("activation", "twice") and registry.get("ffn", "glu")
    assert "broken" in registry.failures and "broken" not in registry.plugins
    with pytest.raises(UnknownNameError, match="plugins that failed to load: broken .see zoo plugins."):
        registry.get("norm", "fancy")


def test_plugin_failing_in_register_is_rolled_back(entry_points):
    def half_then_fail(registry):
        registry.register("activation", "partial", TwiceConfig, lambda c, ctx: Times(c.factor))
        raise RuntimeError("oops")

    entry_points(FakeEntryPoint("half", "zoo-half", plugin_module("half", half_then_fail)))
    with pytest.warns(PluginWarning, match="'half'.*failed to register: RuntimeError: oops"):
        registry = load_registry()
    assert "partial" not in registry.kinds("activation")


def test_strict_plugins_reraises(entry_points, monkeypatch):
    entry_points(FakeEntryPoint("broken", "zoo-broken", error=ImportError("nope")))
    monkeypatch.setenv("ZOO_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match="'broken' .*zoo-broken.*failed to load: ImportError: nope") as info:
        load_registry()
    assert isinstance(info.value.__cause__, ImportError)


def test_zoo_plugins_restricts(entry_points, monkeypatch):
    entry_points(FakeEntryPoint("broken", "zoo-broken", error=ImportError("nope")),
                 FakeEntryPoint("twice", "zoo-twice", plugin_module("twice_plugin")))
    monkeypatch.setenv("ZOO_PLUGINS", "twice")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the broken one is not even imported
        registry = load_registry()
    assert list(registry.plugins) == ["builtins", "twice"]
    monkeypatch.setenv("ZOO_PLUGINS", "twise")
    with pytest.warns(PluginWarning, match="ZOO_PLUGINS names 'twise', which is not installed .did you mean \"twice\""):
        registry = load_registry()
    assert list(registry.plugins) == ["builtins"]


def test_collision_names_both_distributions(entry_points):
    entry_points(FakeEntryPoint("a", "zoo-a", plugin_module("a")), FakeEntryPoint("b", "zoo-b", plugin_module("b")))
    with pytest.raises(PluginCollisionError) as info:
        load_registry()
    msg = str(info.value)
    assert "activation.twice is registered twice" in msg and "zoo-a" in msg and "zoo-b" in msg
    assert "ZOO_PLUGINS" in msg


def test_collision_with_a_builtin(entry_points):
    def steal(registry):
        registry.register("ffn", "glu", TwiceConfig, lambda c, ctx, d: Times(1.0))

    entry_points(FakeEntryPoint("thief", "zoo-thief", plugin_module("thief", steal)))
    with pytest.raises(PluginCollisionError, match="ffn.glu .*qsparse-zoo.*zoo-thief"):
        load_registry()


def test_builtins_are_not_loaded_twice(entry_points):
    ours = FakeEntryPoint("builtins", "qsparse-zoo")  # our own entry point, as an install declares it
    ours.value = "zoo.builtins"
    entry_points(ours)
    assert list(load_registry().plugins) == ["builtins"]


def test_include_entry_points_false(entry_points):
    entry_points(FakeEntryPoint("twice", "zoo-twice", plugin_module("twice_plugin")))
    assert list(load_registry(include_entry_points=False).plugins) == ["builtins"]


def test_register_checks():
    registry = Registry()

    @dataclass
    class Mutable:
        x: int = 1

    @dataclass(frozen=True)
    class HasKind:
        kind: str = "x"

    with pytest.raises(PluginError, match="unknown slot 'fnn' .did you mean \"ffn\""):
        registry.register("fnn", "x", TwiceConfig, Times)
    with pytest.raises(PluginError, match="must be a dataclass"):
        registry.register("ffn", "x", dict, Times)
    with pytest.raises(PluginError, match="must be frozen"):
        registry.register("ffn", "x", Mutable, Times)
    with pytest.raises(PluginError, match="field named 'kind'"):
        registry.register("ffn", "x", HasKind, Times)
    with pytest.raises(PluginError, match="not callable"):
        registry.register("ffn", "x", TwiceConfig, None)
    @dataclass(frozen=True)
    class Undocumented:
        x: int = 1

    registry.register("ffn", "undocumented", Undocumented, Times)
    assert registry.get("ffn", "undocumented").doc == ""
    registry.add_slot("scorer", "ranks things")
    registry.register("scorer", "x", TwiceConfig, Times)
    assert registry.kinds("scorer") == ["x"]


def test_lookup_errors():
    registry = zoo.get_registry()
    expected = """unknown ffn kind 'gul' (did you mean "glu"?); registered:"""
    with pytest.raises(UnknownNameError, match=re.escape(expected)):
        registry.get("ffn", "gul")
    with pytest.raises(UnknownNameError, match="unknown slot 'nrom' .did you mean \"norm\""):
        registry.kinds("nrom")
    assert [e.kind for e in registry.list("norm.*")] == registry.kinds("norm")


def test_plugin_block_in_a_recipe(plugin_registry, tiny_recipe):
    plugin_registry(("twice", plugin_module("twice_plugin")))
    recipe = tiny_recipe("model.ffn.activation={kind='twice', factor=3.0}")
    model = zoo.build(recipe)
    assert model.blocks[0].ffn.act.factor == 3.0
    with pytest.raises(zoo.RecipeError, match="model.ffn.activation.factor: must be > 0"):
        tiny_recipe("model.ffn.activation={kind='twice', factor=0.0}")


def test_plugin_factory_failure_names_the_plugin(plugin_registry, tiny_recipe):
    def bad(registry):
        registry.register("activation", "bad", TwiceConfig, lambda c, ctx: 1 / 0)

    plugin_registry(("badplug", plugin_module("badplug", bad)))
    with pytest.raises(PluginError, match="plugin 'badplug'.*activation.bad at model.ffn.activation.*ZeroDivision"):
        zoo.build(tiny_recipe("model.ffn.activation=bad"))


def test_plugins_command_shows_skipped(cli, entry_points):
    entry_points(FakeEntryPoint("broken", "zoo-broken", error=ImportError("nope")),
                 FakeEntryPoint("twice", "zoo-twice", plugin_module("twice_plugin")))
    from zoo.registry import set_registry

    with pytest.warns(PluginWarning):
        set_registry(load_registry())
    try:
        r = cli("plugins")
        assert "twice" in r.out and "zoo-twice" in r.out and "activation.twice" in r.out
        assert "SKIPPED: failed to load: ImportError: nope" in r.out
        assert "activation.twice" in cli("list", "activation").out
    finally:
        set_registry(None)


def test_cli_warns_on_one_line():
    import subprocess

    code = ("import zoo.registry.plugins as p, types\n"
            "class D: name, version = 'zoo-broken', '9'\n"
            "class E:\n name, value, dist = 'broken', 'x', D()\n def load(self): raise ImportError('gone')\n"
            "p.entry_points = lambda group: [E()]\n"
            "from zoo.cli import main\nraise SystemExit(main(['list', 'ffn']))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ffn.glu" in r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("zoo: warning: zoo plugin 'broken' (zoo-broken 9)")
