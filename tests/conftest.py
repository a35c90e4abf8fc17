"""Shared fixtures: tiny recipes and models, recipe files, the CLI in-process, plugin registries."""

from __future__ import annotations

import os
import shutil

import torch

if not torch.cuda.is_available():  # before any test module (transformers, torch.compile) imports triton:
    os.environ["TRITON_INTERPRET"] = "1"  # Triton reads it at import, so kernels run in its CPU interpreter

from collections.abc import Callable, Iterator  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from types import ModuleType  # noqa: E402

import pytest  # noqa: E402

import zoo  # noqa: E402
from zoo.registry import load_registry, set_registry  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes"
# torch.compile (inductor) and zoo's CPU kernels compile C++ on CPU: without a compiler they cannot run here
HAS_CXX = any(shutil.which(c) for c in (os.environ.get("CXX", "c++"), "g++", "clang++"))
needs_cxx = pytest.mark.skipif(not HAS_CXX, reason="no C++ compiler on this machine")

# The suite decodes with the eager layers (ZOO_COMPILE=0): compiling a layer step costs seconds per model
# kind; tests/test_decode.py checks the compiled step, passing compile=True.
os.environ["ZOO_COMPILE"] = "0"

# Tests use tiny tensors: intra-op threads only spin against each other (and against the
# xdist workers) on a shared 2-core machine — one thread per test process is ~10x faster here.
torch.set_num_threads(1)

# The tiny CPU recipe shrunk further so a forward/backward takes milliseconds.
TINY = ["model.d_model=48", "model.n_layers=2", "model.n_heads=4", "model.max_seq_len=64", "model.ffn.hidden=96"]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def tiny(*overrides: str) -> zoo.Recipe:
    """recipes/tiny/dense.toml shrunk (d_model 48, 2 layers, 4 heads, 64 positions), then `overrides`."""
    return zoo.load_recipe(RECIPES / "tiny/dense.toml", [*TINY, *overrides])


@pytest.fixture
def tiny_recipe() -> Callable[..., zoo.Recipe]:
    """`tiny_recipe("model.ffn.kind=mlp", ...)`: the shrunk tiny recipe with extra overrides."""
    return tiny


@pytest.fixture
def tiny_model() -> torch.nn.Module:
    """A freshly built tiny dense model (seeded)."""
    torch.manual_seed(0)
    return zoo.build(tiny())


@pytest.fixture
def recipe_file(tmp_path: Path) -> Callable[..., Path]:
    """`recipe_file(text, name="r.toml")`: write TOML text into the test's tmp folder, return its path."""

    def write(text: str, name: str = "r.toml") -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return path

    return write


@dataclass
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(capsys) -> Callable[..., CliResult]:
    """`cli("build", path, "--json")`: run `zoo` in-process, return exit code, stdout and stderr."""
    from zoo.cli import main

    def run(*argv: object) -> CliResult:
        capsys.readouterr()
        code = main([str(a) for a in argv])
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


@pytest.fixture
def plugin_registry() -> Iterator[Callable[..., zoo.registry.Registry]]:
    """`plugin_registry(("name", module), ...)`: make built-ins + these plugin modules the process registry.

    Installed entry points are left out so the test sees exactly what it registers (its projection roles
    included: they live on the registry); the process registry is forgotten at teardown.
    """

    def use(*plugins: tuple[str, ModuleType]) -> zoo.registry.Registry:
        registry = load_registry(list(plugins), include_entry_points=False)
        set_registry(registry)
        return registry

    yield use
    set_registry(None)


@pytest.fixture
def poison(monkeypatch):
    """Every torch.empty during the test comes back poisoned (NaN / huge ints), so unwritten outputs show."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan") if t.is_floating_point() else 1 << 30 if t.element_size() >= 4 else 0)

    monkeypatch.setattr(torch, "empty", poisoned)


@pytest.fixture(autouse=True, scope="session")
def _zoo_cache(tmp_path_factory):
    """Tokenized corpora and trained tokenizers go to a temporary cache, not ~/.cache/zoo."""
    import os

    old = os.environ.get("ZOO_CACHE")
    os.environ["ZOO_CACHE"] = str(tmp_path_factory.mktemp("zoo-cache"))
    yield
    if old is None:
        os.environ.pop("ZOO_CACHE", None)
    else:
        os.environ["ZOO_CACHE"] = old
