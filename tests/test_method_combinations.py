"""Every weights × sparsity × activation combination builds and learns; measured sparsity; recipes."""

import itertools

import pytest
import torch

import zoo
from tests.conftest import RECIPES
from tests.tiny import fit
from zoo.eval.sparsity import measure_sparsity

WEIGHTS = {"fp": [], "bitnet158": ["model.weights.kind=bitnet158"],
           "bitnet158-subln": ["model.weights.kind=bitnet158", "model.weights.input_norm=false",
                               'model.attention.sub_norm="rmsnorm"', 'model.ffn.sub_norm="rmsnorm"']}
SPARSITY = {"none": [], "topk": ["model.sparsity.kind=topk", "model.sparsity.keep=0.5"],
            "topk-nostes": ["model.sparsity.kind=topk", "model.sparsity.keep=0.5", "model.sparsity.ste=false"],
            "block_topk": ["model.sparsity.kind=block_topk", "model.sparsity.n=2", "model.sparsity.m=4"],
            "act_topk": ['model.ffn.act_sparsity={kind="topk", keep=0.25}']}
ACTIVATION = {"silu": ["model.ffn.activation=silu"], "relu2": ["model.ffn.activation=relu2"]}
SHAPE = ["model.vocab_size=32", "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.ffn.hidden=48",
         "model.max_seq_len=16"]


def tiny(*overrides):
    return zoo.load_recipe(RECIPES / "tiny/dense.toml", [*SHAPE, *overrides])


@pytest.mark.parametrize("weights,sparsity,activation", list(itertools.product(WEIGHTS, SPARSITY, ACTIVATION)))
def test_combination_builds_and_learns(weights, sparsity, activation):
    torch.manual_seed(0)
    model = zoo.build(tiny(*WEIGHTS[weights], *SPARSITY[sparsity], *ACTIVATION[activation]))
    losses = fit(model, torch.randint(0, 32, (4, 16)), steps=20, lr=1e-2)
    assert losses[-1] < losses[0] - 0.3, losses


def test_measured_sparsity_topk_and_relu2_zeros():
    torch.manual_seed(1)
    model = zoo.build(tiny(*SPARSITY["topk"], *ACTIVATION["relu2"], "model.n_layers=2"))
    table = measure_sparsity(model, [torch.randint(0, 32, (3, 16)) for _ in range(2)])
    roles = table.by_role()
    assert set(roles) == {"qkv", "o", "up_gate", "down"}
    assert roles["qkv"] == pytest.approx(0.5) and roles["up_gate"] == pytest.approx(0.5)
    assert roles["down"] >= 0.5
    assert {r["layer"] for r in table.rows()} == {0, 1}
    layers = table.by_layer()
    assert set(layers) == {0, 1} and layers[0]["qkv"] == pytest.approx(0.5)
    assert min(layers[0]["down"], layers[1]["down"]) <= roles["down"] <= max(layers[0]["down"], layers[1]["down"])
    paper = table.paper()
    assert list(paper) == ["QKV", "Out", "Up", "Gate", "Down", "Overall"]
    assert paper["Up"] == paper["Gate"]
    params = {"qkv": 32 * 96, "o": 32 * 32, "up_gate": 32 * 96, "down": 48 * 32}
    want = sum(params[r] * roles[r] for r in params) / sum(params.values())
    assert paper["Overall"] == pytest.approx(want)


def test_relu2_alone_gives_natural_down_sparsity_only():
    torch.manual_seed(2)
    model = zoo.build(tiny(*ACTIVATION["relu2"]))
    roles = measure_sparsity(model, [torch.randint(0, 32, (2, 16))]).by_role()
    assert roles["qkv"] == 0.0 and roles["up_gate"] == 0.0
    assert 0.2 < roles["down"] < 0.8  # about half the gates are negative at init


def test_act_sparsity_applies_topk_after_the_silu():
    torch.manual_seed(3)
    model = zoo.build(tiny(*SPARSITY["act_topk"]))
    ffn = model.blocks[0].ffn
    assert ffn.down.keep == pytest.approx(0.25)
    seen = {}
    ffn.down.sparsify.register_forward_hook(lambda m, a, out: seen.setdefault("x", out))
    model(torch.randint(0, 32, (2, 16)))
    assert ((seen["x"] != 0).sum(-1) == 12).all()  # int(0.25 * 48) per token
    acc = zoo.account(model)
    assert acc.by_role["down"]["activated"] == pytest.approx(0.25 * acc.by_role["down"]["params"])


def test_sub_norm_sits_before_o_and_down():
    model = zoo.build(tiny('model.attention.sub_norm={kind="rmsnorm", eps=1e-5}', 'model.ffn.sub_norm="rmsnorm"'))
    attn, ffn = model.blocks[0].attn, model.blocks[0].ffn
    assert attn.sub_norm.weight.shape == (32,) and ffn.sub_norm.weight.shape == (48,)
    assert attn.sub_norm.eps == 1e-5


@pytest.mark.parametrize("name", ["qsparse", "qsparse-nostes", "block-qsparse", "relu2", "bitnet", "bitnet-qsparse"])
def test_tiny_recipes_build_and_run(name):
    recipe = zoo.load_recipe(RECIPES / f"tiny/{name}.toml", ["model.n_layers=1"])
    model = zoo.build(recipe)
    out = model(torch.randint(0, 256, (1, 8)), torch.randint(0, 256, (1, 8)))
    assert torch.isfinite(out.loss)
    expected = {"qsparse": 0.5, "qsparse-nostes": 0.5, "block-qsparse": 0.5, "bitnet-qsparse": 0.5}
    assert zoo.account(model).sparsity == pytest.approx(expected.get(name, 0.0))


@pytest.mark.parametrize("size", ["300m", "700m", "1.3b", "7b"])
def test_paper_variants_build_on_meta(size):
    sparse = zoo.account(zoo.build(zoo.load_recipe(RECIPES / f"paper/qsparse-{size}.toml"), device="meta"))
    bit = zoo.account(zoo.build(zoo.load_recipe(RECIPES / f"paper/bitnet-qsparse-{size}.toml"), device="meta"))
    assert sparse.sparsity == pytest.approx(0.3, abs=2e-3) and bit.sparsity == pytest.approx(sparse.sparsity)
    assert bit.inference_storage_ratio <= 1 / 14 and sparse.inference_storage_ratio == 1.0


def test_measured_sparsity_inside_bitnet_projections():
    torch.manual_seed(4)
    model = zoo.build(tiny(*WEIGHTS["bitnet158"], *SPARSITY["topk"]))
    roles = measure_sparsity(model, [torch.randint(0, 32, (2, 16))]).by_role()
    assert roles["qkv"] == pytest.approx(0.5) and roles["o"] == pytest.approx(0.5)
