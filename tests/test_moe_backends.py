"""The MoE layer's expert matmuls, backend by backend: the fused row gather (`triton`, under the
interpreter on CPU) and the gathering `torch` paths against a naive per-token float64 reference,
forward and backward; BitNet experts as one grouped matmul against the per-expert path and the formula."""

import random
import types
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import zoo
from tests.test_bitnet import formula, reference_topk
from tests.test_kernels import rel_err
from tests.test_moe import random_route
from zoo.blocks.router import Routing
from zoo.kernels.grouped import grouped_mm_supported
from zoo.kernels.moe_permute import GatheredRows, RowLayout, combine, sort_tokens
from zoo.model.projection import ExpertProjection
from zoo.recipe.recipe import recipe_from_dict

TOL = {torch.float32: 2e-5, torch.float16: 4e-3}
BACKENDS = {"triton": "triton", "torch": "torch", "torch-loop": {"kind": "torch", "grouped_mm": False}}


def ffn_of(model: dict, ffn: dict, registry=None) -> nn.Module:
    """The FFN block of a one-layer model (the real build path)."""
    base = {"vocab_size": 16, "n_layers": 1, "n_heads": 1, "head_dim": 4, "max_seq_len": 8, **model, "ffn": ffn}
    return zoo.build(recipe_from_dict({"model": base}, registry=registry), registry=registry).blocks[0].ffn


def perturb(module: nn.Module, scale: float = 0.3) -> None:
    """Every parameter away from its init (norm gains and biases differ per expert too)."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * scale)


def naive_reference(moe: nn.Module, dense: nn.Module, x: torch.Tensor, route: Routing, keep=None):
    """float64, one token and one choice at a time: y[t] = Σ_j gate[t, j] · expert_e(x[t]), expert e being the
    dense FFN `dense` run with slice e of the stacked expert parameters. Returns y and the float64 leaves."""
    x64 = x.detach().double().requires_grad_()
    gates = route.weights.detach().double().requires_grad_()
    stacked = {n: p.detach().double().requires_grad_() for n, p in moe.experts.named_parameters()}
    dense = dense.double()
    ys = []
    for t in range(x.shape[0]):
        y_t = x64.new_zeros(x.shape[1])
        for j in range(route.experts.shape[1]):
            if keep is None or (t, j) in keep:
                e = int(route.experts[t, j])
                y_t = y_t + gates[t, j] * functional_call(dense, {n: p[e] for n, p in stacked.items()},
                                                          (x64[t : t + 1],))[0]
        ys.append(y_t)
    return torch.stack(ys), x64, gates, stacked


def layer_and_twin(E, H, D, backend, sparsity, registry=None, expert=None, dtype=torch.float32, **moe_keys):
    model = {"d_model": D, "sparsity": sparsity}
    expert = expert or {"kind": "glu", "hidden": H, "activation": "silu", "bias": True}
    moe = ffn_of(model, {"kind": "moe", "num_experts": E, "top_k": 2, "expert": expert, "backend": backend,
                         **moe_keys}, registry)
    dense = ffn_of(model, expert, registry)
    perturb(moe.experts)
    return moe.to(dtype), dense


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_moe_layer_forward_backward_per_backend_equals_naive_float64(poison, backend, dtype):
    """Uneven experts (one empty, one with a single token), odd sizes (for `torch`: sizes torch._grouped_mm
    takes, so that path runs), top-K on the experts' input (the mask runs on the T tokens before the gather),
    outputs poisoned with NaN before the call."""
    seed = list(BACKENDS).index(backend) + 10 * (dtype == torch.float16)
    torch.manual_seed(seed)
    g = random.Random(seed)
    aligned = backend == "torch"
    E, T = 7, g.randint(17, 31)
    D, H = (g.choice([24, 40]), g.choice([16, 24])) if aligned else (g.choice([21, 27]), g.choice([11, 13]))
    sparsity = {"kind": "topk", "keep": 0.6, "roles": {"down": {"kind": "none"}}}  # fp16 rounding of the
    moe, dense = layer_and_twin(E, H, D, BACKENDS[backend], sparsity, dtype=dtype)  # hidden would move a down mask
    route = random_route(T, E, 2, [3, 1, 6, 0, 4])  # expert 2 gets nothing (and 5 nothing yet)
    route.experts[T // 2, 0] = 5  # expert 5: exactly one token
    route = Routing(route.weights.requires_grad_(), route.experts, route.probs, route.logits)
    x = torch.randn(T, D, dtype=dtype, requires_grad=True)
    w = moe.experts.up_gate.linear.weight
    assert grouped_mm_supported(x, w) == aligned and grouped_mm_supported(x, w.new_empty(E, D, H)) == aligned
    y = moe.dispatch(x, route)
    dy = torch.randn_like(y)
    y.backward(dy)
    ref, x64, gates64, stacked64 = naive_reference(moe, dense, x, route)
    ref.backward(dy.double())
    tol = TOL[dtype]
    assert y.dtype == dtype and rel_err(y, ref) < tol
    assert rel_err(x.grad, x64.grad) < tol
    assert rel_err(route.weights.grad, gates64.grad) < tol
    for name, p in moe.experts.named_parameters():
        assert rel_err(p.grad, stacked64[name].grad) < tol, name
        assert not p.grad[2].any(), name  # an empty expert's gradient is written: zero


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_capacity_mode_per_backend_equals_naive_float64(backend):
    torch.manual_seed(20)
    E, T, D, H = 4, 15, 19, 9
    moe, dense = layer_and_twin(E, H, D, BACKENDS[backend], {"kind": "topk", "keep": 0.5}, capacity_factor=0.6)
    route = random_route(T, E, 2, [2, 0, 3, 1], skew=3.0)
    cap, seen, keep = moe.capacity(T), [0] * E, set()
    for t in range(T):
        for j in range(2):
            e = int(route.experts[t, j])
            keep |= {(t, j)} if seen[e] < cap else set()
            seen[e] += 1
    x = torch.randn(T, D, requires_grad=True)
    y = moe.dispatch(x, route)
    y.backward(torch.ones_like(y))
    ref, x64, _, _ = naive_reference(moe, dense, x, route, keep)
    ref.backward(torch.ones_like(ref))
    assert int(moe.last_stats["dropped"]) > 0
    assert rel_err(y, ref) < TOL[torch.float32] and rel_err(x.grad, x64.grad) < TOL[torch.float32]


class TwoPathFFN(zoo.contracts.FFN):
    """A plugin FFN that uses its input twice: once straight into a projection (the gather is fused) and once
    through its own op (`flip`, which gathers the rows): down(act(up(x)) ⊙ sigmoid(gate(flip(x))))."""

    def __init__(self, cfg, ctx, d_model: int):
        super().__init__()
        self.hidden = cfg.hidden
        self.up = ctx.projection("up_gate", d_model, cfg.hidden, False)
        self.gate = ctx.projection("up_gate", d_model, cfg.hidden, False)
        self.down = ctx.projection("down", cfg.hidden, d_model, False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[-1] == self.up.in_features  # metadata: no gather
        return self.down(F.relu(self.up(x)) * torch.sigmoid(self.gate(x.flip(-1))))


@dataclass(frozen=True)
class TwoPathConfig:
    """two paths from the input"""

    hidden: int = zoo.recipe.param(8, "width")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_plugin_ffn_kind_as_experts_with_lazily_gathered_input(plugin_registry, backend):
    plugin = types.ModuleType("twopath")
    plugin.zoo_register = zoo.hookimpl(lambda registry: registry.register("ffn", "twopath", TwoPathConfig,
                                                                          TwoPathFFN))
    registry = plugin_registry(("twopath", plugin))
    torch.manual_seed(21)
    E, T, D = 5, 14, 17
    moe, dense = layer_and_twin(E, 7, D, BACKENDS[backend], {"kind": "topk", "keep": 0.7}, registry,
                                {"kind": "twopath", "hidden": 7})
    route = random_route(T, E, 2, [4, 0, 1, 3])
    x = torch.randn(T, D, requires_grad=True)
    y = moe.dispatch(x, route)
    y.backward(torch.ones_like(y))
    ref, x64, _, _ = naive_reference(moe, dense, x, route)
    ref.backward(torch.ones_like(ref))
    assert rel_err(y, ref) < TOL[torch.float32] and rel_err(x.grad, x64.grad) < TOL[torch.float32]


def test_gathered_rows_gather_once_only_when_used():
    torch.manual_seed(22)
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    expert = torch.tensor([2, 0, 1, 0, 2, 2, 1, 0, 0, 2])  # 5 tokens × top-2
    order = torch.argsort(expert, stable=True)
    counts = torch.bincount(expert, minlength=3)
    layout = RowLayout.build(expert, order, counts)
    rows = GatheredRows(x, layout, 2)
    assert rows.shape == (10, 3) and rows.dtype == x.dtype and rows.dim() == 2 and rows._gathered is None
    want = torch.zeros(10, 3, dtype=torch.float64)
    want[layout.row_of_pair] = x.detach()[torch.arange(10) // 2]
    doubled = rows * 2
    assert type(doubled) is torch.Tensor and rows._gathered is not None
    torch.testing.assert_close(doubled, 2 * want)
    torch.testing.assert_close(rows.sum(-1), want.sum(-1))  # the same gather, reused
    doubled.sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 4.0))  # each token sits in two rows


@pytest.mark.parametrize("cap", [None, 2, 0])  # dropless, some pairs dropped, every pair dropped
def test_permutation_gather_and_combine_equal_per_pair_loop_with_gradients(cap):
    """sort_tokens and combine (embedding_bag forward / gather backward) against a per-pair float64 loop:
    uneven and empty experts, odd sizes, dropped pairs contributing 0; gradcheck in x, rows and gates."""
    torch.manual_seed(24)
    T, k, E, D = 11, 3, 5, 7
    expert = torch.stack([torch.randperm(E - 1)[:k] for _ in range(T)]).flatten()  # expert E-1 stays empty
    order = torch.argsort(expert, stable=True)
    counts = torch.bincount(expert, minlength=E)
    if cap is not None:
        start = torch.cumsum(counts, 0) - counts
        order = order[torch.arange(order.numel()) - start[expert[order]] < cap]
        counts = counts.clamp(max=cap)
    layout = RowLayout.build(expert, order, counts)
    kept = set(order.tolist())
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    rows = torch.randn(order.numel(), D, dtype=torch.float64, requires_grad=True)
    gates = torch.rand(T, k, dtype=torch.float64, requires_grad=True)
    want_rows = torch.stack([x[p // k] for p in order.tolist()]) if kept else x.new_zeros(0, D)
    torch.testing.assert_close(sort_tokens(x, layout, k), want_rows)
    row = {p: r for r, p in enumerate(order.tolist())}
    want_y = torch.stack([sum((gates[t, j] * rows[row[t * k + j]] for j in range(k) if t * k + j in kept),
                              x.new_zeros(D)) for t in range(T)])
    torch.testing.assert_close(combine(rows, gates, layout), want_y)
    assert torch.autograd.gradcheck(lambda x: sort_tokens(x, layout, k), (x,))
    assert torch.autograd.gradcheck(lambda rows, gates: combine(rows, gates, layout), (rows, gates))
    y = combine(rows, gates, layout)
    y.backward(torch.randn_like(y))
    assert all(gates.grad.flatten()[p] == 0 for p in range(T * k) if p not in kept)


def bitnet_moe(input_norm: bool, bias: bool, E=5, D=19, H=9, keep=0.5) -> nn.Module:
    model = {"d_model": D, "weights": {"kind": "bitnet158", "input_norm": input_norm},
             "sparsity": {"kind": "topk", "keep": keep}}
    expert = {"kind": "glu", "hidden": H, "activation": "relu2", "bias": bias}
    moe = ffn_of(model, {"kind": "moe", "num_experts": E, "top_k": 2, "expert": expert}).double()
    perturb(moe.experts, 0.1)
    return moe


@pytest.mark.parametrize("input_norm, bias", [(True, True), (False, False)])
def test_bitnet_experts_grouped_equal_per_expert_path_with_gradients(input_norm, bias):
    """One grouped matmul (per-expert β, each row normed with its expert's gain, mask after the norm) against
    each expert run on its own through BitLinear.forward (float64, forward and every gradient)."""
    torch.manual_seed(23 + input_norm)
    grouped = bitnet_moe(input_norm, bias)
    per_expert = bitnet_moe(input_norm, bias)
    per_expert.load_state_dict(grouped.state_dict())
    for m in per_expert.modules():
        if isinstance(m, ExpertProjection):
            m.grouped = False
    x = torch.randn(23, 19, dtype=torch.float64)
    dy = torch.randn(23, 19, dtype=torch.float64)
    results = []
    for moe in (grouped, per_expert):
        xi = x.clone().requires_grad_()
        y = moe(xi)
        y.backward(dy)
        results.append([y, xi.grad, *(p.grad for p in moe.parameters())])
    names = ["y", "x", *(n for n, _ in grouped.named_parameters())]
    for name, a, b in zip(names, *results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("input_norm", [True, False])
def test_bitnet_expert_projection_equals_the_formula(input_norm):
    """Each row of the grouped BitNet expert projection is BitNet b1.58 of its expert: RMSNorm with that expert's
    gain, top-K mask of the normalised input, int8 absmax, W̃β with that expert's β, its bias."""
    torch.manual_seed(25)
    moe = bitnet_moe(input_norm, True, keep=0.4)
    proj = moe.experts.up_gate
    T, k = 11, 2
    x = torch.randn(T, 19, dtype=torch.float64)
    expert = moe.router(x).experts.flatten()
    layout = RowLayout.build(expert, torch.argsort(expert, stable=True), torch.bincount(expert, minlength=5))
    with moe.groups.sorted_rows(layout.offsets, layout.row_expert):
        y = proj(GatheredRows(x, layout, k))
    lin = proj.linear
    want = torch.stack([
        formula(x[int(p) // k][None], lin.weight[e].detach(), lin.norm.weight[e] if input_norm else None,
                mask=reference_topk(int(0.4 * 19)), bias=lin.bias[e])[0]
        for p, e in zip(layout.pair_of_row.tolist(), layout.row_expert.tolist())])
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("input_norm", [True, False])  # without the norm the triton kernel fuses the gather
def test_bitnet_experts_triton_backend_equals_torch_backend(input_norm):
    torch.manual_seed(26)
    layers = []
    for backend in ("torch", "triton"):
        model = {"d_model": 21, "weights": {"kind": "bitnet158", "input_norm": input_norm},
                 "sparsity": {"kind": "topk", "keep": 0.5}}
        layers.append(ffn_of(model, {"kind": "moe", "num_experts": 5, "top_k": 2, "backend": backend,
                                     "expert": {"kind": "glu", "hidden": 13, "activation": "relu2"}}))
    perturb(layers[0].experts, 0.1)
    layers[1].load_state_dict(layers[0].state_dict())
    x = torch.randn(19, 21)
    grads = []
    for moe in layers:
        xi = x.clone().requires_grad_()
        y = moe(xi)
        y.backward(torch.ones_like(y))
        grads.append([y, xi.grad, *(p.grad for p in moe.experts.parameters())])
    for a, b in zip(*grads):  # ~2e-7 measured; a hidden entry at a rounding boundary could move one int8 level
        assert rel_err(b, a) < 1e-4
