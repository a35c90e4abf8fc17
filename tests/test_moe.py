"""MoE FFN: dropless dispatch against a naive per-token loop (float64), capacity mode, aux losses,
gradients, shared experts, backends, accounting, recipes."""

import math
import random
import types
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import zoo
from tests.conftest import RECIPES
from tests.tiny import fit
from zoo.blocks.router import Routing
from zoo.recipe.recipe import recipe_from_dict


def build_moe(ffn: dict, d_model: int = 24, dtype=torch.float64, registry=None, weights=None) -> nn.Module:
    """One MoE layer, built through a one-layer recipe (the real build path)."""
    model = {"vocab_size": 16, "d_model": d_model, "n_layers": 1, "n_heads": 1, "max_seq_len": 8, "ffn": ffn}
    if weights:
        model["weights"] = weights
    model = zoo.build(recipe_from_dict({"model": model}, registry=registry), registry=registry)
    return model.blocks[0].ffn.to(dtype)


def expert_glu(moe, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert e of a GLU-expert MoE, written out from its stacked weights."""
    w_ug = moe.experts.up_gate.linear.weight[e]
    w_d = moe.experts.down.linear.weight[e]
    gate, up = (x @ w_ug.T).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ w_d.T


def naive(moe, x: torch.Tensor, route: Routing, keep=None) -> torch.Tensor:
    """y[t] = Σ_j gate[t, j] · expert_{e[t, j]}(x[t]), one token and one choice at a time."""
    y = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(route.experts.shape[1]):
            if keep is None or (t, j) in keep:
                e = int(route.experts[t, j])
                y[t] += route.weights[t, j].to(x.dtype) * expert_glu(moe, e, x[t : t + 1])[0]
    return y


def random_route(T: int, E: int, k: int, experts_used: list[int], skew: float = 2.0) -> Routing:
    """A routing over a subset of experts with uneven load (some experts get nothing)."""
    probs = torch.zeros(T, E, dtype=torch.float64)
    logits = torch.randn(T, E, dtype=torch.float64)
    weights_of = torch.tensor([skew ** -i for i in range(len(experts_used))])
    ids = torch.stack([torch.multinomial(weights_of, k, replacement=False) for _ in range(T)])
    experts = torch.tensor(experts_used)[ids]
    gates = torch.rand(T, k, dtype=torch.float64)
    probs = logits.softmax(-1)
    return Routing(gates.float(), experts, probs.float(), logits.float())


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_dropless_dispatch_equals_per_token_loop(seed):
    g = random.Random(seed)
    torch.manual_seed(seed)
    E, k, T, D, H = g.randint(3, 7), g.choice([1, 2, 3]), g.randint(5, 29), g.choice([10, 14, 24]), g.randint(3, 11)
    moe = build_moe({"kind": "moe", "num_experts": E, "top_k": k, "expert": {"kind": "glu", "hidden": H},
                     "backend": "torch"}, D)
    x = torch.randn(T, D, dtype=torch.float64)
    used = g.sample(range(E), max(k, E - 2))  # at least one expert stays empty when E - 2 > k
    route = random_route(T, E, k, used)
    y = moe.dispatch(x, route)
    torch.testing.assert_close(y, naive(moe, x, route), rtol=1e-12, atol=1e-12)
    stats = moe.last_stats
    assert int(stats["dropped"]) == 0
    assert int(stats["tokens_per_expert"].sum()) == T * k
    assert stats["tokens_per_expert"].tolist() == torch.bincount(route.experts.flatten(), minlength=E).tolist()


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("top_k", [1, 3])
def test_forward_with_router_equals_reference(renormalize, top_k):
    torch.manual_seed(3)
    E, D, H = 5, 18, 7
    moe = build_moe({"kind": "moe", "num_experts": E, "top_k": top_k, "expert": {"kind": "glu", "hidden": H},
                     "router": {"kind": "softmax_topk", "renormalize": renormalize}}, D)
    x = torch.randn(2, 11, D, dtype=torch.float64)
    y = moe(x)
    flat = x.reshape(-1, D)
    probs = (flat.float() @ moe.router.weight.float().T).softmax(-1)
    gates, experts = probs.topk(top_k, -1)
    if renormalize:
        gates = gates / gates.sum(-1, keepdim=True)
    ref = naive(moe, flat, Routing(gates, experts, probs, probs))
    torch.testing.assert_close(y.reshape(-1, D), ref, rtol=1e-6, atol=1e-6)  # gates are fp32 by design


def test_router_math_is_fp32_and_jitter_only_in_training():
    moe = build_moe({"kind": "moe", "num_experts": 4, "top_k": 2, "router": {"kind": "softmax_topk", "jitter": 0.5}},
                    dtype=torch.bfloat16)
    x = torch.randn(9, 24, dtype=torch.bfloat16)
    moe.eval()
    r1, r2 = moe.router(x), moe.router(x)
    assert r1.logits.dtype == r1.probs.dtype == r1.weights.dtype == torch.float32
    torch.testing.assert_close(r1.logits, r2.logits)
    moe.train()
    assert not torch.equal(moe.router(x).logits, moe.router(x).logits)


def test_sigmoid_router():
    moe = build_moe({"kind": "moe", "num_experts": 6, "top_k": 2,
                     "router": {"kind": "sigmoid_topk", "renormalize": False}})
    x = torch.randn(7, 24, dtype=torch.float64)
    r = moe.router(x)
    scores = torch.sigmoid(x.float() @ moe.router.weight.float().T)
    torch.testing.assert_close(r.weights, scores.topk(2, -1).values)
    torch.testing.assert_close(r.probs.sum(-1), torch.ones(7))


def test_capacity_mode_drops_exactly_the_pairs_over_capacity():
    torch.manual_seed(4)
    E, k, T = 4, 2, 13
    moe = build_moe({"kind": "moe", "num_experts": E, "top_k": k, "capacity_factor": 0.5,
                     "expert": {"kind": "glu", "hidden": 5}, "backend": "torch"})
    cap = math.ceil(0.5 * T * k / E)
    route = random_route(T, E, k, [2, 0, 3, 1], skew=3.0)
    x = torch.randn(T, 24, dtype=torch.float64)
    keep, seen = set(), [0] * E
    for t in range(T):  # the first `cap` (token, choice) pairs of each expert, in token order
        for j in range(k):
            e = int(route.experts[t, j])
            if seen[e] < cap:
                keep.add((t, j))
            seen[e] += 1
    y = moe.dispatch(x, route)
    torch.testing.assert_close(y, naive(moe, x, route, keep), rtol=1e-12, atol=1e-12)
    assert int(moe.last_stats["dropped"]) == T * k - len(keep) == sum(max(0, c - cap) for c in seen) > 0


def test_aux_losses_equal_hand_formulas():
    torch.manual_seed(5)
    E, k, T = 5, 2, 17
    moe = build_moe({"kind": "moe", "num_experts": E, "top_k": k, "aux_loss": 0.03, "z_loss": 0.002})
    x = torch.randn(T, 24, dtype=torch.float64)
    moe(x)
    logits = (x.float() @ moe.router.weight.float().T).tolist()
    probs = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in logits]
    chosen = [sorted(range(E), key=lambda i: -row[i])[:k] for row in probs]
    f = [sum(e in c for c in chosen) / (T * k) for e in range(E)]
    p = [sum(row[e] for row in probs) / T for e in range(E)]
    lb = 0.03 * E * sum(fi * pi for fi, pi in zip(f, p))
    z = 0.002 * sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits) / T
    assert moe.aux_losses["moe_lb"].item() == pytest.approx(lb, rel=1e-5)
    assert moe.aux_losses["moe_z"].item() == pytest.approx(z, rel=1e-5)
    ent = -sum(v * math.log(v) for row in probs for v in row) / T
    assert moe.last_stats["router_entropy"].item() == pytest.approx(ent, rel=1e-5)


def test_aux_losses_off_and_in_model_output():
    moe = build_moe({"kind": "moe", "num_experts": 4, "top_k": 1, "aux_loss": 0.0, "z_loss": 0.0})
    moe(torch.randn(3, 24, dtype=torch.float64))
    assert moe.aux_losses == {}
    recipe = zoo.load_recipe(RECIPES / "tiny/moe.toml", ["model.n_layers=2", "model.d_model=48", "model.n_heads=4"])
    model = zoo.build(recipe)
    idx = torch.randint(0, 256, (2, 9))
    out = model(idx, idx)
    assert set(out.aux_losses) == {"moe_lb", "moe_z"}
    per_layer = [b.ffn.aux_losses["moe_lb"] for b in model.blocks]
    torch.testing.assert_close(out.aux_losses["moe_lb"], sum(per_layer))
    torch.testing.assert_close(out.total_loss, out.loss + out.aux_losses["moe_lb"] + out.aux_losses["moe_z"])


def test_gradients_match_naive_reference_and_gradcheck():
    torch.manual_seed(6)
    E, k, T, D, H = 3, 2, 5, 6, 4
    moe = build_moe({"kind": "moe", "num_experts": E, "top_k": k, "expert": {"kind": "glu", "hidden": H},
                     "router": {"kind": "softmax_topk", "renormalize": False}, "z_loss": 0.0}, D)
    # fp32 gates would limit gradcheck's precision: run the router in float64 for this test
    moe.router.logits = types.MethodType(lambda self, x: F.linear(x, self.weight), moe.router)
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    params = dict(moe.named_parameters())

    def f(x, *ps):
        out = torch.func.functional_call(moe, dict(zip(params, ps)), (x,))
        return out, moe.aux_losses["moe_lb"]

    assert torch.autograd.gradcheck(f, (x, *params.values()), eps=1e-6, atol=1e-6)

    y, lb = f(x, *params.values())
    (y.square().sum() + lb).backward()
    xr = x.detach().clone().requires_grad_()
    probs = F.linear(xr, moe.router.weight).softmax(-1)
    gates, experts = probs.topk(k, -1)
    yr = naive(moe, xr, Routing(gates, experts, probs, probs))
    f_i = torch.bincount(experts.flatten(), minlength=E).double() / (T * k)
    lbr = 0.01 * E * (f_i * probs.mean(0)).sum()
    grads = torch.autograd.grad(yr.square().sum() + lbr, [xr, *params.values()])
    for got, ref in zip([x.grad, *(p.grad for p in params.values())], grads):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_backends_agree_with_gradients(dtype):
    torch.manual_seed(7)
    cfg = {"kind": "moe", "num_experts": 6, "top_k": 2, "expert": {"kind": "glu", "hidden": 12}}
    backends = ("auto", "torch", {"kind": "torch", "grouped_mm": False}, "torch")
    moes = [build_moe({**cfg, "backend": b}, 32, dtype) for b in backends]
    moes[3].backend.fuses_gather = lambda x: False  # rows gathered by the layer's permutation gather instead
    for m in moes[1:]:
        m.load_state_dict(moes[0].state_dict())
    x = torch.randn(37, 32, dtype=dtype)
    g = torch.randn(37, 32, dtype=dtype)
    outs, grads = [], []
    for m in moes:
        xi = x.clone().requires_grad_()
        y = m(xi)
        y.backward(g)
        outs.append(y)
        grads.append([xi.grad, *(p.grad for p in m.parameters())])
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6}
    for y, gr in zip(outs[1:], grads[1:]):
        torch.testing.assert_close(y, outs[0], **tol)
        for a, b in zip(gr, grads[0]):
            torch.testing.assert_close(a, b, **tol)
    if dtype == torch.float32:
        exact = moes[0].double()(x.double())
        torch.testing.assert_close(outs[0].double(), exact, rtol=1e-4, atol=1e-5)


class PlainLinear(nn.Linear, zoo.contracts.Weights):
    """A weights block without `operands`: experts then run one by one with their own parameters."""


@dataclass(frozen=True)
class PlainConfig:
    """nn.Linear with a bias"""


def test_weights_kind_without_operands_runs_per_expert():
    plugin = types.ModuleType("plainweights")

    @zoo.hookimpl
    def zoo_register(registry):
        registry.register("weights", "plain", PlainConfig, lambda cfg, ctx, i, o, bias: PlainLinear(i, o, bias=True))

    plugin.zoo_register = zoo_register
    registry = zoo.registry.load_registry(extra=[("plainweights", plugin)])
    cfg = {"kind": "moe", "num_experts": 4, "top_k": 2, "expert": {"kind": "glu", "hidden": 6}}
    plain = build_moe(cfg, registry=registry, weights={"kind": "plain"})
    fp = build_moe({**cfg, "expert": {"kind": "glu", "hidden": 6, "bias": True}})
    assert plain.experts.up_gate.linear.bias.shape == (4, 12)
    with torch.no_grad():
        for p in plain.experts.parameters():
            p.normal_()
    fp.load_state_dict(plain.state_dict())
    x = torch.randn(15, 24, dtype=torch.float64)
    torch.testing.assert_close(plain(x), fp(x), rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # two tokens, no autograd: MoE.pair_dispatch, each row with its expert's parameters
        assert plain.routes_by_pair(x[:2])
        torch.testing.assert_close(plain(x[:2]), fp(x)[:2], rtol=1e-12, atol=1e-12)


def test_shared_experts_with_gate_equal_reference():
    torch.manual_seed(8)
    D, H, S = 20, 6, 3
    moe = build_moe({"kind": "moe", "num_experts": 4, "top_k": 2, "expert": {"kind": "glu", "hidden": H},
                     "shared_experts": 2, "shared_hidden": S, "shared_gate": True}, D)
    assert moe.shared.hidden == 2 * S and moe.shared.up_gate.role == "shared_up_gate"
    x = torch.randn(9, D, dtype=torch.float64)
    routed = moe.dispatch(x, moe.router(x))
    gate, up = moe.shared.up_gate(x).chunk(2, -1)
    shared = moe.shared.down(F.silu(gate) * up) * torch.sigmoid(x @ moe.shared_gate.weight.T)
    torch.testing.assert_close(moe(x), routed + shared)


def test_accounting_total_and_activated_by_hand():
    D, E, k, H, S, V = 16, 8, 2, 12, 10, 32
    recipe = recipe_from_dict({"model": {
        "vocab_size": V, "d_model": D, "n_layers": 2, "n_heads": 2, "max_seq_len": 8,
        "ffn": {"kind": "moe", "num_experts": E, "top_k": k, "expert": {"kind": "glu", "hidden": H},
                "shared_experts": 1, "shared_hidden": S, "shared_gate": True},
        "layers": [{"range": "0", "ffn": {"kind": "glu", "hidden": 40}}]}})
    acc = zoo.account(zoo.build(recipe))
    attn = 4 * D * D
    norms = 2 * D
    dense_ffn = 3 * D * 40
    experts = E * 3 * D * H
    shared = 3 * D * S + D  # + gate
    router = E * D
    moe_layer = attn + norms + experts + shared + router
    total_non_emb = (attn + norms + dense_ffn) + moe_layer + D  # + final norm
    assert acc.total_params == V * D + total_non_emb
    assert acc.activated_params == total_non_emb - experts + experts * k / E
    assert acc.by_role["expert_up_gate"] == {"params": E * 2 * D * H, "activated": k * 2 * D * H}


def test_layer_patterns_and_moe_shared_recipe():
    recipe = zoo.load_recipe(RECIPES / "tiny/moe-shared.toml")
    model = zoo.build(recipe, device="meta")
    kinds = [type(b.ffn).__name__ for b in model.blocks]
    assert kinds[0] == "GLU" and all(k == "MoE" for k in kinds[1:])
    assert model.blocks[1].ffn.shared is not None
    every_other = recipe_from_dict({"model": {"n_layers": 5, "d_model": 32, "n_heads": 2, "layers": [
        {"range": "1-", "every": 2, "ffn": {"kind": "moe", "num_experts": 4, "top_k": 1}}]}})
    model = zoo.build(every_other, device="meta")
    assert [type(b.ffn).__name__ for b in model.blocks] == ["GLU", "MoE", "GLU", "MoE", "GLU"]


@pytest.mark.parametrize("name", ["moe", "moe-shared"])
def test_tiny_recipes_train_and_round_trip(tmp_path, name):
    torch.manual_seed(9)
    recipe = zoo.load_recipe(RECIPES / f"tiny/{name}.toml",
                             ["model.n_layers=2", "model.d_model=32", "model.n_heads=2"])
    model = zoo.build(recipe)
    idx = torch.randint(0, 256, (4, 33))
    losses = fit(model, idx, steps=6, lr=3e-3)
    assert losses[-1] < losses[0]
    zoo.save(model, tmp_path / "ckpt")
    loaded = zoo.load(tmp_path / "ckpt")
    torch.testing.assert_close(loaded(idx).logits, model(idx).logits)


def test_recipe_errors_name_the_key():
    with pytest.raises(zoo.RecipeError, match=r"model\.ffn\.top_k: top_k=5 exceeds num_experts=4"):
        recipe_from_dict({"model": {"ffn": {"kind": "moe", "num_experts": 4, "top_k": 5}}})
    with pytest.raises(zoo.RecipeError, match=r"model\.ffn\.router\.kind: unknown router kind 'softmax'"):
        recipe_from_dict({"model": {"ffn": {"kind": "moe", "router": "softmax"}}})
    with pytest.raises(zoo.RecipeError, match=r"model\.ffn\.backend\.kind: unknown kernel-backend kind"):
        recipe_from_dict({"model": {"ffn": {"kind": "moe", "backend": "cuda"}}})


@pytest.mark.parametrize("name, total, activated", [
    ("mixtral-8x7b", 46.70e9, 12.88e9), ("olmoe-1b-7b", 6.92e9, 1.28e9), ("qwen1.5-moe-a2.7b", 14.32e9, 2.69e9)])
def test_public_moe_shapes_match_published_sizes(name, total, activated):
    acc = zoo.account(zoo.build(zoo.load_recipe(RECIPES / f"public/{name}.toml"), device="meta"))
    assert acc.total_params == pytest.approx(total, rel=0.005)
    assert acc.activated_params + acc.embedding_params == pytest.approx(activated, rel=0.005)


@pytest.mark.parametrize("weights, sparsity", [
    ({"kind": "fp"}, {"kind": "topk", "keep": 0.5}),                 # grouped path, top-K on sorted rows
    ({"kind": "bitnet158"}, {"kind": "topk", "keep": 0.4}),          # per-expert path, mask inside BitLinear
])
def test_experts_equal_dense_ffns_with_the_same_weights_and_sparsity(weights, sparsity):
    """Each expert computes exactly what a dense FFN (plain Projection path) with its weights does."""
    torch.manual_seed(10)
    E, k, D, H = 4, 2, 20, 9
    base = {"vocab_size": 16, "d_model": D, "n_layers": 1, "n_heads": 1, "max_seq_len": 8,
            "weights": weights, "sparsity": sparsity}
    expert = {"kind": "glu", "hidden": H, "activation": "relu2"}
    moe_model = zoo.build(recipe_from_dict({"model": {**base, "ffn": {
        "kind": "moe", "num_experts": E, "top_k": k, "expert": expert}}})).double()
    dense = zoo.build(recipe_from_dict({"model": {**base, "ffn": expert}})).blocks[0].ffn.double()
    moe = moe_model.blocks[0].ffn
    assert type(moe.experts.up_gate.linear).__name__ == type(dense.up_gate.linear).__name__
    with torch.no_grad():
        for p in moe.experts.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # experts differ in every parameter, norms included
    x = torch.randn(13, D, dtype=torch.float64)
    route = moe.router(x)
    outs = []
    for e in range(E):
        dense.load_state_dict({n: v[e] for n, v in moe.experts.state_dict().items()})
        outs.append(dense(x))
    ref = sum(route.weights[:, j, None].double() * torch.stack([outs[int(e)][t] for t, e in
                                                                enumerate(route.experts[:, j])]) for j in range(k))
    torch.testing.assert_close(moe(x), ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("weights, sparsity, bias", [
    ({"kind": "fp"}, None, True),
    ({"kind": "fp"}, {"kind": "topk", "keep": 0.5}, False),
    ({"kind": "bitnet158"}, {"kind": "topk", "keep": 0.4}, False),  # a norm gain per expert: per-row inputs
])
def test_pair_dispatch_at_decode_equals_sorted_dispatch(weights, sparsity, bias):
    """Without autograd and with T·k <= E (decode), each (token, choice) row goes through its own expert
    (`pair_dispatch`, static shapes): the same outputs as the sorted dispatch, shared experts included."""
    torch.manual_seed(12)
    E, k, D, H = 6, 2, 20, 9
    model = {"vocab_size": 16, "d_model": D, "n_layers": 1, "n_heads": 1, "max_seq_len": 8, "weights": weights,
             "sparsity": sparsity or {"kind": "none"},
             "ffn": {"kind": "moe", "num_experts": E, "top_k": k, "shared_experts": 1,
                     "expert": {"kind": "glu", "hidden": H, "bias": bias}}}
    moe = zoo.build(recipe_from_dict({"model": model})).double().blocks[0].ffn
    with torch.no_grad():
        for p in moe.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # experts differ in every parameter, norms and biases included
    for T in (1, 3):
        x = torch.randn(1, T, D, dtype=torch.float64)
        assert not moe.routes_by_pair(x.flatten(0, 1))  # autograd on: the sorted dispatch
        ref, stats = moe(x), moe.last_stats
        with torch.no_grad():
            assert moe.routes_by_pair(x.flatten(0, 1))
            torch.testing.assert_close(moe(x), ref, rtol=1e-12, atol=1e-12)
            assert moe.aux_losses == {}
            assert moe.last_stats is not stats and moe.last_stats.keys() == stats.keys()
            for key, value in stats.items():
                torch.testing.assert_close(moe.last_stats[key], value, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("scale,beta_shape", [("matrix", (8, 1)), ("row", (8, 512, 1))])
def test_moe_bitnet_qsparse_trains_and_freezes(tmp_path, scale, beta_shape):
    torch.manual_seed(11)
    recipe = zoo.load_recipe(RECIPES / "tiny/moe-bitnet-qsparse.toml",
                             ["model.n_layers=2", "model.d_model=32", "model.n_heads=2",
                              f"model.weights.scale='{scale}'"])
    model = zoo.build(recipe)
    up = model.blocks[0].ffn.experts.up_gate
    assert type(up.linear).__name__ == "BitLinear" and up.keep == 0.5 and up.role == "expert_up_gate"
    per_layer = 8 * 2 * 32 * 256
    assert zoo.account(model).by_role["expert_up_gate"] == {"params": 2 * per_layer,
                                                            "activated": 2 * per_layer * 2 / 8 * 0.5}
    idx = torch.randint(0, 256, (4, 25))
    losses = fit(model, idx, steps=6, lr=3e-3)
    assert losses[-1] < losses[0]
    before = model(idx).logits
    model.freeze()
    torch.testing.assert_close(model(idx).logits, before)
    up = model.blocks[0].ffn.experts.up_gate.linear  # packed 2-bit per expert, β per expert (or per its rows)
    assert not any(n.endswith("weight") and p.dim() == 3 for n, p in up.named_parameters())
    assert up.packed.dtype == torch.uint8 and up.packed.shape == (8, 32, 512 // 4) and up.scale.shape == beta_shape
    acc = zoo.account(model)
    held = sum(b.numel() * b.element_size() for m in model.modules() if hasattr(m, "packed")
               for b in (m.packed, m.scale))
    assert acc.projection_bytes_inference == held
    zoo.save(model, tmp_path / "frozen")
    loaded = zoo.load(tmp_path / "frozen")
    torch.testing.assert_close(loaded(idx).logits, before)


def test_evaluate_reports_expert_load_and_router_entropy():
    from zoo.eval.evaluate import evaluate

    torch.manual_seed(12)
    recipe = zoo.load_recipe(RECIPES / "tiny/moe.toml", ["model.n_layers=1", "model.d_model=32", "model.n_heads=2"])
    model = zoo.build(recipe).eval()
    x = torch.randint(0, 256, (2, 17))
    report = evaluate(model, [(x[:, :-1], x[:, 1:])])
    model(x[:, :-1])
    stats = model.blocks[0].ffn.last_stats
    (layer,) = report["expert_load"]
    assert layer["module"] == "blocks.0.ffn"
    assert layer["load"] == [round(float(v), 4) for v in stats["load"]]
    assert layer["load_cv"] == pytest.approx(float(stats["load_cv"]))
    assert layer["router_entropy"] == pytest.approx(float(stats["router_entropy"]))


def test_capacity_so_small_that_every_pair_is_dropped():
    """ceil(factor · T · k / E) can be 0: no expert runs, the layer outputs zeros (found by the recipe fuzz)."""
    recipe = zoo.load_recipe(RECIPES / "tiny/dense.toml", {"model.n_layers": 1, "model.d_model": 8, "model.n_heads": 2,
                                                           "model.ffn": {"kind": "moe", "top_k": 1,
                                                                         "capacity_factor": 5e-324}})
    model = zoo.build(recipe)
    x = torch.randint(0, 256, (1, 1))  # one token: 5e-324 · 1 · 1 / 8 underflows to 0
    out = model(x, x)
    out.total_loss.backward()
    assert int(model.blocks[0].ffn.last_stats["dropped"]) == 1 and torch.isfinite(out.loss)
