"""plugins/zoo-example, pip-installed for real into a throwaway folder (`pip install --target`: the package
and its dist-info with the entry point), put on sys.path of this process and of the `zoo` subprocesses:
discovered by entry point, listed, built, trained one step. The environment running the tests is never
changed."""

import importlib
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

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
def target(tmp_path_factory) -> Path:
    """A folder holding zoo-example as pip installs it (--no-deps --target): nothing else is touched."""
    tmp = tmp_path_factory.mktemp("plugin")
    src, target = tmp / "zoo-example", tmp / "site"
    shutil.copytree(PLUGIN, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    before = pip("freeze").stdout
    r = pip("install", "--no-deps", "--target", str(target), *no_isolation(), str(src))
    assert r.returncode == 0, r.stderr
    assert any(target.glob("zoo_example-0.1.0.dist-info/entry_points.txt"))
    assert pip("freeze").stdout == before  # the environment running the tests is as it was
    return target


@pytest.fixture
def installed(target, monkeypatch):
    """The throwaway install on this process's sys.path for one test (entry points are read from sys.path)."""
    monkeypatch.syspath_prepend(str(target))  # also invalidates the import caches; undone after the test
    yield target
    sys.modules.pop("zoo_example", None)
    importlib.invalidate_caches()
    set_registry(None)


def zoo_cli(target: Path, *args: str) -> subprocess.CompletedProcess:
    path = os.pathsep.join([str(target), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return subprocess.run([sys.executable, "-m", "zoo", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": path})


@pytest.mark.slow  # pip builds and installs a wheel
def test_zoo_list_and_plugins_show_it(installed, cli):
    r = zoo_cli(installed, "list", "norm")  # a fresh process discovers the entry point
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


@pytest.mark.slow  # pip builds and installs a wheel
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
