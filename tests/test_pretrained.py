"""The pretrained catalogue: names resolve wherever a checkpoint folder is accepted, import once into
ZOO_HOME, and every bad state (unknown name, missing source, changed source, corrupt cache) is handled."""

from __future__ import annotations

import json
import types
import warnings

import pytest
import torch

import zoo
from tests.conftest import tiny
from zoo.errors import CheckpointError
from zoo.io.hf import export_hf
from zoo.io.pretrained import CatalogueNotice, LocalPath, PackageFile, Pretrained, cache_folder

NAME = "tiny-llama"
pytestmark = pytest.mark.filterwarnings("ignore::zoo.io.pretrained.CatalogueNotice")  # the tests that count them catch


def catalogue_module(**entries: type) -> types.ModuleType:
    """A plugin module registering `entries` ({name: Pretrained subclass}) in the `pretrained` slot."""
    module = types.ModuleType("catalogue_plugin")

    @zoo.hookimpl
    def zoo_register(registry):
        for name, cls in entries.items():
            registry.register("pretrained", name, cls, cls)

    module.zoo_register = zoo_register
    return module


@pytest.fixture
def source(tmp_path):
    """A Hugging Face folder (what a user downloads) exported from a tiny zoo model with non-trivial weights."""
    torch.manual_seed(0)
    model = zoo.build(tiny())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    zoo.save(model, tmp_path / "orig")
    return export_hf(tmp_path / "orig", tmp_path / "hf"), model


@pytest.fixture
def catalogue(source, plugin_registry, tmp_path, monkeypatch):
    """The registry with NAME (the tiny HF folder) and two entries whose sources are missing; ZOO_HOME in tmp."""
    monkeypatch.setenv("ZOO_HOME", str(tmp_path / "home"))
    folder, model = source

    class Tiny(Pretrained):
        """a tiny LLaMA for the tests"""

        tags = ("test",)
        architecture = "llama"
        parameters = sum(p.numel() for p in model.parameters())
        license = "MIT"
        source = LocalPath("hf", path=str(folder), how="make it")

    class Missing(Pretrained):
        architecture = "llama"
        source = PackageFile("gguf", dist="zoo-no-such-dist", path="weights.gguf")

    plugin_registry(("catalogue", catalogue_module(**{NAME: Tiny, "absent-model": Missing})))
    return model


def logits(model, idx):
    with torch.no_grad():
        return model.eval()(idx).logits


IDX = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))


def notices(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    return out, [str(w.message) for w in caught if issubclass(w.category, CatalogueNotice)]


def test_load_by_name_imports_once_and_computes_the_source_function(catalogue, tmp_path):
    model, said = notices(lambda: zoo.load(NAME))
    assert len(said) == 1 and "importing" in said[0] and "(once)" in said[0]
    torch.testing.assert_close(logits(model, IDX), logits(catalogue, IDX))
    (folder,) = [p for p in cache_folder(NAME).iterdir() if not p.name.startswith(".")]
    meta = json.loads((folder / "meta.json").read_text())
    assert folder.name == f"{meta['source']['sha256'][:16]}-llama-v1"
    assert meta["source"]["catalogue"] == NAME and model.recipe.name == NAME
    again, said = notices(lambda: zoo.load(NAME))  # the cache is reused: no notice
    assert said == []
    torch.testing.assert_close(logits(again, IDX), logits(catalogue, IDX))


def test_overrides_at_load(catalogue):
    model = zoo.load(NAME, overrides=["model.sparsity.kind='topk'", "model.sparsity.keep=0.5"])
    assert model.recipe.model.sparsity.kind == "topk"
    assert not torch.allclose(logits(model, IDX), logits(catalogue, IDX))
    with pytest.raises(CheckpointError, match="threshold"):  # a recipe with other tensors does not load
        zoo.load(NAME, overrides=["model.sparsity.kind='threshold'"])


def test_unknown_name_and_missing_source(catalogue, cli, tmp_path):
    r = cli("eval", "tiny-lama")
    assert r.code == 2 and 'did you mean "tiny-llama"' in r.err and len(r.err.strip().splitlines()) == 1
    with pytest.raises(CheckpointError, match="did you mean"):
        zoo.load("tiny-lama")
    r = cli("generate", "absent-model", "--prompt", "x")
    assert r.code == 2 and "pip install --no-deps zoo-no-such-dist" in r.err
    assert len(r.err.strip().splitlines()) == 1
    r = cli("eval", tmp_path / "no-such-folder")  # a path is still a path
    assert r.code == 2 and "no such checkpoint or run folder" in r.err


def test_changed_source_is_reimported_with_a_notice(catalogue, source):
    zoo.load(NAME)
    weights = source[0] / "model.safetensors"
    state = __import__("safetensors.torch", fromlist=["load_file"]).load_file(str(weights))
    state["model.norm.weight"] = state["model.norm.weight"] * 2
    __import__("safetensors.torch", fromlist=["save_file"]).save_file(state, str(weights))
    model, said = notices(lambda: zoo.load(NAME))
    assert len(said) == 1 and "source changed" in said[0]
    torch.testing.assert_close(model.state_dict()["norm.weight"], catalogue.state_dict()["norm.weight"] * 2)
    assert len([p for p in cache_folder(NAME).iterdir() if not p.name.startswith(".")]) == 1  # the stale one is gone


@pytest.mark.parametrize("damage", ["flip", "truncate", "meta"])
def test_corrupt_cache_entry_is_reimported_never_loaded(catalogue, damage):
    zoo.load(NAME)
    (folder,) = [p for p in cache_folder(NAME).iterdir() if not p.name.startswith(".")]
    weights = folder / "model.safetensors"
    if damage == "flip":
        data = bytearray(weights.read_bytes())
        data[-100] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:1000])
    else:
        (folder / "meta.json").write_text("{")
    model, said = notices(lambda: zoo.load(NAME))
    assert len(said) == 1 and "unusable" in said[0]
    torch.testing.assert_close(logits(model, IDX), logits(catalogue, IDX))


def test_converter_version_change_reimports(catalogue, monkeypatch):
    from zoo.io.arch import Converter

    zoo.load(NAME)
    monkeypatch.setattr(Converter, "version", 2)
    _, said = notices(lambda: zoo.load(NAME))
    assert len(said) == 1 and "converter changed" in said[0]
    assert [p.name.rsplit("-", 1)[1] for p in cache_folder(NAME).iterdir() if not p.name.startswith(".")] == ["v2"]


def test_zoo_models_lists_installed_and_the_install_command(catalogue, cli):
    r = cli("models", "--json")
    assert r.code == 0
    rows = {row["name"]: row for row in json.loads(r.out)}
    assert rows[NAME]["installed"] and not rows[NAME]["imported"] and rows[NAME]["license"] == "MIT"
    assert rows["absent-model"] == {**rows["absent-model"], "installed": False,
                                    "install": "pip install --no-deps zoo-no-such-dist"}
    zoo.load(NAME)
    assert json.loads(cli("models", "--json").out)[1]["imported"]
    r = cli("models")
    assert "not installed: pip install --no-deps zoo-no-such-dist" in r.out and NAME in r.out


def test_cli_eval_and_generate_take_a_name_and_set(catalogue, cli):
    dense = json.loads(cli("eval", NAME, "--json", "--batches", "1").out)
    sparse = cli("eval", NAME, "--json", "--batches", "1", "--set", 'model.sparsity={kind="topk", keep=0.5}')
    assert sparse.code == 0
    sparse = json.loads(sparse.out)
    assert dense["sparsity"]["overall"] == 0 and sparse["sparsity"]["overall"] == pytest.approx(0.5)
    r = cli("generate", NAME, "--prompt", "In the", "--max-new-tokens", "3", "--temperature", "0",
            "--set", 'model.sparsity={kind="topk", keep=0.5}')
    assert r.code == 0 and r.out.startswith("In the")


def test_init_from_and_extends_take_a_name(catalogue, tmp_path, recipe_file):
    from zoo.train.loop import copy_weights

    model = zoo.build(tiny("model.sparsity.kind='topk'"))
    copy_weights(model, NAME, "train.init_from")
    torch.testing.assert_close(model.state_dict()["embed.weight"], catalogue.state_dict()["embed.weight"])
    path = recipe_file(f'extends = "{NAME}"\n[model.sparsity]\nkind = "topk"\n[train]\ninit_from = "{NAME}"\n')
    recipe = zoo.load_recipe(path)
    assert recipe.model.d_model == catalogue.config.d_model and recipe.model.sparsity.kind == "topk"
    assert recipe.train.init_from == NAME
