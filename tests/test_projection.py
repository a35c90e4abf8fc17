"""`Projection.split`: one matmul per block of output rows, the same function as forward + split."""

import pytest
import torch

import zoo
from zoo.kernels.prepare import prepare_inference

WEIGHTS = [[], ["model.weights.kind=bitnet158"], ["model.weights.kind=bitnet158", "model.weights.scale=row"]]
SPARSITY = [[], ["model.sparsity.kind=topk", "model.sparsity.keep=0.4"],
            ["model.sparsity.kind=topk", "model.sparsity.keep=0.5", "model.sparsity.ste=false"]]
# odd sizes: gate/up halves of 56, q/k/v of 48/24/24 (grouped-query), biases on every projection
SHAPE = ["model.ffn.hidden=56", "model.n_kv_heads=2", "model.ffn.bias=true", "model.attention.qkv_bias=true",
         "model.attention.o_bias=true"]


def build(tiny_recipe, *overrides):
    torch.manual_seed(0)
    return zoo.build(tiny_recipe(*SHAPE, *overrides))


def split_and_reference(proj, x, sizes):
    """Outputs and input gradient of proj.split(x, sizes) and of proj(x).split(sizes), under one upstream gradient."""
    outs = []
    for fn in (lambda t: proj.split(t, sizes), lambda t: proj(t).split(sizes, -1)):
        t = x.clone().requires_grad_()
        parts = fn(t)
        weights = [torch.linspace(-1, 1, p.numel(), dtype=p.dtype).view_as(p) for p in parts]
        sum((p * w).sum() for p, w in zip(parts, weights)).backward()
        grads = {n: p.grad.clone() for n, p in proj.named_parameters()}
        proj.zero_grad(set_to_none=True)
        outs.append((parts, t.grad, grads))
    return outs


@pytest.mark.parametrize("weights", WEIGHTS, ids=lambda o: ",".join(o) or "fp")
@pytest.mark.parametrize("sparsity", SPARSITY, ids=lambda o: ",".join(o) or "dense")
def test_split_equals_forward_then_split(tiny_recipe, weights, sparsity):
    model = build(tiny_recipe, *weights, *sparsity).double()
    x = torch.randn(3, 7, model.config.d_model, dtype=torch.float64)
    block = model.blocks[1]
    hidden = block.ffn.hidden
    for proj, sizes in ((block.ffn.up_gate, (hidden, hidden)), (block.attn.qkv, (48, 24, 24))):
        (got, gx, gw), (want, wx, ww) = split_and_reference(proj, x, sizes)
        assert [p.shape[-1] for p in got] == list(sizes) and all(p.is_contiguous() for p in got)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(gx, wx, rtol=1e-12, atol=1e-12)
        assert gw.keys() == ww.keys() and gw
        for name in gw:
            torch.testing.assert_close(gw[name], ww[name], rtol=1e-12, atol=1e-12)


def test_split_without_operands_runs_the_forward(tiny_recipe):
    """Inference kernels (no `operands`) keep their one fused call; the parts are the same."""
    model = build(tiny_recipe, "model.sparsity.kind=topk", "model.sparsity.keep=0.5").eval()
    proj = model.blocks[0].ffn.up_gate
    x = torch.randn(1, 1, model.config.d_model)
    with torch.no_grad():
        want = proj(x).split(proj.out_features // 2, -1)
        prepare_inference(model)
        assert proj.linear.operands is None
        got = proj.split(x, (proj.out_features // 2, proj.out_features // 2))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
