"""prepare_inference: a prepared model computes what the unprepared one does, up to rounding."""

import pytest
import torch

import zoo
from tests.conftest import RECIPES
from zoo.blocks.bitnet import TernaryLinear
from zoo.blocks.weights import TopKLinear, TransposedLinear
from zoo.kernels.prepare import prepare_inference

SHAPE = ["model.n_layers=2", "model.d_model=48", "model.n_heads=4", "model.ffn.hidden=72", "model.vocab_size=61"]
TOPK = ["model.sparsity.kind='topk'", "model.sparsity.keep=0.4"]
BITNET = ["model.weights.kind='bitnet158'"]


def build(extra: list[str], freeze: bool = False) -> torch.nn.Module:
    model = zoo.build(zoo.load_recipe(RECIPES / "tiny/dense.toml", SHAPE + extra)).eval()
    return model.freeze() if freeze else model


def logits_two_ways(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of a 5-token prompt (prefill: dense path) and of 3 single-token decode steps (gather path)."""
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    with torch.no_grad():
        cache = model.new_cache(1)
        full = model(ids[:, :5], cache=cache).logits
        steps = torch.cat([model(ids[:, t:t + 1], cache=cache, start=t).logits for t in range(5, 8)], 1)
    return full, steps


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).double().norm() / b.double().norm()).item()


@pytest.mark.parametrize("impl", ["torch", "triton", "auto"])  # auto on CPU: the compiled kernels where built
def test_topk_model_prepared_matches(impl):
    model = build(TOPK)
    torch.manual_seed(0)
    before = logits_two_ways(model)
    prepare_inference(model, impl=impl)
    assert sum(isinstance(m, TopKLinear) for m in model.modules()) == 2 * 4  # qkv, o, up_gate, down per layer
    torch.manual_seed(0)
    after = logits_two_ways(model)
    for a, b in zip(after, before):
        assert rel(a, b) < 1e-5


@pytest.mark.parametrize("impl,sparse", [("torch", False), ("torch", True), ("triton", True), ("auto", False),
                                         ("auto", True)])
def test_frozen_bitnet_prepared_matches(impl, sparse):
    """Decode steps through each path; `auto` on CPU: the fused `ternary_gemv` where the kernels are built."""
    from zoo.kernels import cpu

    model = build(BITNET + (TOPK if sparse else []), freeze=True)
    torch.manual_seed(0)
    before = logits_two_ways(model)
    prepare_inference(model, impl=impl)
    layers = [m for m in model.modules() if isinstance(m, TernaryLinear)]
    assert len(layers) == 2 * 4
    if impl == "auto" and not torch.cuda.is_available():
        assert {m.layout for m in layers} == {"rows" if cpu.available() else "int8"}
    torch.manual_seed(0)
    after = logits_two_ways(model)
    for a, b in zip(after, before):
        assert rel(a, b) < 1e-5


def test_prepared_model_saves_an_ordinary_checkpoint(tmp_path):
    model = build(TOPK)
    keys = set(model.state_dict())
    prepare_inference(model)
    assert set(model.state_dict()) == keys
    zoo.save(model, tmp_path / "m")
    loaded = zoo.load(tmp_path / "m").eval()
    ids = torch.randint(0, 61, (2, 6))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_moe_qsparse_model_prepared_matches():
    """Attention projections get TopKLinear; the stacked expert projections keep their grouped path."""
    overrides = [*SHAPE[:3], SHAPE[4], "model.ffn.expert.hidden=24", *TOPK]
    model = zoo.build(zoo.load_recipe(RECIPES / "tiny/moe.toml", overrides))
    torch.manual_seed(0)
    before = logits_two_ways(model.eval())
    prepare_inference(model)
    assert sum(isinstance(m, TopKLinear) for m in model.modules()) == 2 * 2  # qkv and o of each layer
    torch.manual_seed(0)
    for a, b in zip(logits_two_ways(model), before):
        assert rel(a, b) < 1e-5


def test_frozen_bitnet_moe_prepared_keeps_expert_weights_unpacked_and_matches():
    """Frozen BitNet experts keep W̃·β unpacked after prepare_inference (not saved); logits unchanged."""
    overrides = [*SHAPE[:3], SHAPE[4], "model.ffn.expert.hidden=24", *TOPK, *BITNET]
    model = zoo.build(zoo.load_recipe(RECIPES / "tiny/moe.toml", overrides)).eval().freeze()
    keys = set(model.state_dict())
    torch.manual_seed(0)
    before = logits_two_ways(model)
    prepare_inference(model)
    experts = [m.linear for m in model.modules() if type(m).__name__ == "ExpertProjection"]
    assert experts and all(e._buffers.get("dequantized") is not None for e in experts)
    assert set(model.state_dict()) == keys  # the unpacked copy is not saved
    torch.manual_seed(0)
    for a, b in zip(logits_two_ways(model), before):
        assert rel(a, b) < 1e-5


def test_dense_fp32_model_gets_the_transposed_layout_and_matches():
    """fp32 on CPU: every dense projection becomes `x @ Wt`; logits match, the state dict keeps its keys."""
    model = build([])
    keys = set(model.state_dict())
    torch.manual_seed(0)
    before = logits_two_ways(model)
    reference = model.blocks[0].ffn.down.linear.weight.detach().double().clone()
    prepare_inference(model)
    assert not any(isinstance(m, (TopKLinear, TernaryLinear)) for m in model.modules())
    assert sum(type(m) is TransposedLinear for m in model.modules()) == 2 * 4
    assert set(model.state_dict()) == keys
    x = torch.randn(3, 7, model.blocks[0].ffn.down.in_features, dtype=torch.float64)
    y = model.blocks[0].ffn.down.linear(x.float())
    assert rel(y, x @ reference.t()) < 1e-6  # against float64, fresh inputs, odd leading dims
    torch.manual_seed(0)
    for a, b in zip(logits_two_ways(model), before):
        assert rel(a, b) < 1e-5


@pytest.mark.parametrize("impl", ["torch", "auto"])
def test_dense_bf16_model_takes_wt_only_with_the_compiled_gemv(impl):
    """bf16 on CPU: torch's ops read W faster through F.linear (nothing to swap); zoo's compiled GEMV reads
    Wt faster still, so with it the projections take `TransposedLinear`, with the same logits."""
    from zoo.kernels import cpu

    model = build([]).to(torch.bfloat16)
    torch.manual_seed(0)
    before = logits_two_ways(model)
    prepare_inference(model, impl=impl)
    swapped = any(isinstance(m, TransposedLinear) for m in model.modules())
    assert swapped is (impl == "auto" and cpu.available())
    torch.manual_seed(0)
    for a, b in zip(logits_two_ways(model), before):
        assert rel(a, b) < 1e-2


@pytest.mark.parametrize("tied", [True, False])
def test_untied_head_gets_the_transposed_layout(tmp_path, tied):
    """An untied fp32 LM head decodes from Wt like the projections; a tied one stays the embedding's (same
    parameter, same state dict) and decodes from a transposed copy where the compiled GEMV is built."""
    from zoo.blocks.weights import TiedTransposedHead
    from zoo.kernels import cpu

    model = build([f"model.tie_embeddings={str(tied).lower()}"])
    keys = set(model.state_dict())
    torch.manual_seed(0)
    before = logits_two_ways(model)
    prepare_inference(model)
    assert isinstance(model.head, TransposedLinear) is not tied
    assert (model.head.weight is model.embed.weight) is tied
    assert isinstance(model.head, TiedTransposedHead) is (tied and cpu.available())
    torch.manual_seed(0)
    for a, b in zip(logits_two_ways(model), before):
        assert rel(a, b) < 1e-5
    assert set(model.state_dict()) == keys
    zoo.save(model, tmp_path / "m")
    ids = torch.randint(0, 61, (2, 6))
    with torch.no_grad():
        assert torch.allclose(zoo.load(tmp_path / "m").eval()(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
