"""The contract is enough: the example plugin's `int8` weights kind (plugins/zoo-example/zoo_example/int8.py)
brings its own inference form, and `prepare_inference` and `zoo generate` use it, with nothing in zoo naming it.

The plugin is loaded in-process from its source folder (not installed) and registered with `plugin_registry`.
"""

import importlib.util
import sys

import pytest
import torch

import zoo
from tests.conftest import ROOT, TINY
from zoo.blocks.sparsity import NoSparsity
from zoo.kernels import prepare_inference
from zoo.model.projection import Projection

SOURCE = ROOT / "plugins" / "zoo-example" / "zoo_example"


@pytest.fixture
def example(plugin_registry, monkeypatch):
    """The example plugin's module, loaded from its source and registered (built-ins + it)."""
    spec = importlib.util.spec_from_file_location("zoo_example_src", SOURCE / "__init__.py",
                                                  submodule_search_locations=[str(SOURCE)])
    module = importlib.util.module_from_spec(spec)
    monkeypatch.delitem(sys.modules, "zoo_example_src.int8", raising=False)  # a fresh copy of each file
    monkeypatch.setitem(sys.modules, "zoo_example_src", module)
    spec.loader.exec_module(module)
    plugin_registry(("example", module))
    return module


def int8_model(*overrides: str) -> torch.nn.Module:
    recipe = zoo.load_recipe(ROOT / "recipes/tiny/dense.toml", [*TINY, "model.weights.kind='int8'", *overrides])
    return zoo.build(recipe).eval()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("rows,bias", [(1, True), (5, False)])
def test_int8_gemv_equals_the_float64_definition(example, rows, bias):
    """The int32-accumulated GEMV against float64 on the same quantized values, odd sizes; and against the
    frozen block it came from (same function, up to float32 rounding)."""
    int8 = example.int8
    torch.manual_seed(0)
    block = int8.build_int8(int8.Int8Config(), None, 37, 23, bias)
    if bias:
        torch.nn.init.normal_(block.bias)
    block.freeze()
    form = block.inference_form(NoSparsity(), torch.device("cpu"), torch.float32)
    assert type(form).__name__ == "Int8GEMV" and form.qweight.dtype == torch.int8
    x = torch.randn(rows, 37)
    xq, a = int8.absmax_int8(x)
    want = (xq.double() @ block.qweight.double().t()) * a.double() * block.scale.double().reshape(-1)
    if bias:
        want = want + block.bias.double()
    with torch.no_grad():
        got = form(x)
        assert rel(got, want) < 1e-6
        assert rel(block(x), want) < 1e-6
    assert form.bytes_per_token() == 37 * 23 + 4 * 23 + 4 * 23 * bias


@pytest.mark.parametrize("sparsity", [[], ["model.sparsity.kind='topk'", "model.sparsity.keep=0.5"]])
def test_prepare_inference_puts_the_plugins_form_in_place(example, sparsity):
    model = int8_model(*sparsity).freeze()
    keys = set(model.state_dict())
    ids = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        before = model(ids).logits
        prepare_inference(model)
        after = model(ids).logits
    forms = [m.linear for m in model.modules() if isinstance(m, Projection)]
    assert len(forms) == 2 * 4 and all(type(f).__name__ == "Int8GEMV" for f in forms)
    assert rel(after, before) < 1e-5
    assert set(model.state_dict()) == keys  # still saves as the frozen checkpoint it came from


def test_zoo_generate_decodes_through_the_int8_gemv(example, tmp_path, cli, monkeypatch):
    """A tiny int8 checkpoint (frozen, so `zoo.load` replays the freeze): `zoo generate` runs the plugin's GEMV
    for every projection of every decode step."""
    model = int8_model().freeze()
    zoo.save(model, tmp_path / "ckpt")
    calls: list[tuple[int, ...]] = []
    kernel = example.int8.int8_matmul

    def counted(xq, q):
        calls.append((*xq.shape, xq.dtype == torch.int8 and q.dtype == torch.int8))
        return kernel(xq, q)

    monkeypatch.setattr(example.int8, "int8_matmul", counted)
    res = cli("generate", tmp_path / "ckpt", "--prompt", "the", "--max-new-tokens", "4", "--temperature", "0")
    assert res.code == 0, res.err
    assert res.out.startswith("the")
    assert all(int8 for *_, int8 in calls)
    # per projection (2 layers × 4): the 3-byte prompt once, then one row per decode step (generate runs the
    # model after each of the 4 tokens it yields)
    assert sorted(rows for rows, _, _ in calls) == [1] * 4 * 2 * 4 + [3] * 2 * 4


def test_accounting_counts_the_int8_storage(example):
    acc = zoo.account(int8_model())
    assert acc.projection_bytes_inference == sum(
        m.out_features * (m.in_features + 4) for m in int8_model().modules() if isinstance(m, Projection))
