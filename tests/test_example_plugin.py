"""plugins/zoo-example, pip-installed for real: discovered by entry point, listed, built, trained one step."""

import importlib
import importlib.util
import json
import math
import shutil
import subprocess
import sys

import pytest
import torch

import zoo
from tests.conftest import ROOT, TINY
from zoo.registry import load_registry, set_registry

PLUGIN = ROOT / "plugins" / "zoo-example"


def pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args],
                          capture_output=True, text=True, timeout=600)


def no_isolation() -> list[str]:
    """Skip pip's isolated build environment (a download, slow on busy machines) when a wheel can be built here."""
    try:
        from importlib.metadata import version

        major, minor = (int(x) for x in version("setuptools").split(".")[:2])
    except Exception:
        return []
    return ["--no-build-isolation"] if (major, minor) >= (70, 1) or importlib.util.find_spec("wheel") else []


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """pip install --no-deps a copy of the plugin into this interpreter's environment; uninstall afterwards."""
    src = tmp_path_factory.mktemp("plugin") / "zoo-example"
    shutil.copytree(PLUGIN, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    r = pip("install", "--no-deps", *no_isolation(), str(src))
    assert r.returncode == 0, r.stderr
    importlib.invalidate_caches()
    yield
    pip("uninstall", "-y", "zoo-example")
    sys.modules.pop("zoo_example", None)
    importlib.invalidate_caches()
    set_registry(None)


def zoo_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zoo", *args], capture_output=True, text=True, timeout=300)


def test_zoo_list_and_plugins_show_it(installed, cli):
    r = zoo_cli("list", "norm")  # a fresh process discovers the entry point
    assert r.returncode == 0, r.stderr
    assert any(line.split()[:2] == ["norm.scalenorm", "example"] for line in r.stdout.splitlines())
    set_registry(load_registry())
    try:
        rows = json.loads(cli("plugins", "--json").out)
        [row] = [x for x in rows if x["name"] == "example"]
        assert (row["distribution"], row["version"], row["registered"]) == ("zoo-example", "0.1.0",
                                                                            ["norm.scalenorm", "weights.int8"])
        info = json.loads(cli("show", "norm.scalenorm", "--json").out)
        assert [f["name"] for f in info["fields"]] == ["eps"] and info["distribution"] == "zoo-example"
        assert json.loads(cli("build", PLUGIN / "example.toml", "--json").out)["name"] == "dense-scalenorm"
    finally:
        set_registry(None)


def test_recipe_using_it_builds_and_trains(installed):
    set_registry(load_registry())
    try:
        recipe = zoo.load_recipe(PLUGIN / "example.toml", TINY)
        assert recipe.model.norm.kind == "scalenorm"
        torch.manual_seed(0)
        model = zoo.build(recipe)
        norms = [m for m in model.modules() if type(m).__name__ == "ScaleNorm"]
        assert len(norms) == 2 * 2 + 1 and norms[0].g.item() == pytest.approx(math.sqrt(48))
        x = torch.randn(3, 48, dtype=torch.float64)  # g · x / ‖x‖ against a float64 reference
        torch.testing.assert_close(norms[0].double()(x), math.sqrt(48) * x / x.norm(dim=-1, keepdim=True))
        model.float()
        idx = torch.randint(0, 256, (2, 12))
        out = model(idx[:, :-1], idx[:, 1:])
        assert torch.isfinite(out.loss)
        out.loss.backward()
        assert all(torch.isfinite(n.g.grad) and n.g.grad != 0 for n in norms)
    finally:
        set_registry(None)


def test_without_the_plugin_the_recipe_names_the_missing_kind():
    registry = load_registry(include_entry_points=False)
    with pytest.raises(zoo.RecipeError, match=r'model.norm.kind: unknown norm kind .scalenorm.'):
        zoo.recipe.recipe_from_dict({"model": {"norm": "scalenorm"}}, registry=registry)
