"""BitNet b1.58: forward vs the hand formula (float64), quantized top-K, packing, freeze, storage."""

import itertools

import pytest
import torch
from safetensors import safe_open

import zoo
from tests.conftest import RECIPES, needs_cxx
from zoo.blocks.bitnet import BitLinear
from zoo.blocks.sparsity import TopK
from zoo.kernels.ternary import pack_ternary, unpack_ternary
from zoo.model.projection import Projection


def formula(x, w, g=None, eps=1e-5, norm_eps=1e-6, mask=None, bias=None):
    """BitNet b1.58 by hand in float64: Y = (Q(X) ⊙ M)·(RoundClip(W/β, -1, 1)·β)ᵀ, X = RMSNorm(x) if g."""
    x, w = x.double(), w.double()
    if g is not None:
        x = x / torch.sqrt((x * x).mean(-1, keepdim=True) + norm_eps) * g.double()
    beta = w.abs().mean() + eps
    wq = torch.clamp(torch.round(w / beta), -1, 1) * beta
    s = 127.0 / x.abs().amax(-1, keepdim=True).clamp(min=1e-5)
    xq = torch.clamp(torch.round(x * s), -128, 127) / s
    if mask is not None:
        xq = xq * mask(x)
    y = xq @ wq.T
    return y if bias is None else y + bias.double()


def reference_topk(k):
    def mask(x):
        idx = x.abs().sort(dim=-1, descending=True, stable=True).indices[..., :k]
        return torch.zeros_like(x).scatter(-1, idx, 1.0)
    return mask


def random_bitlinear(n_in: int, n_out: int, bias: bool, input_norm: bool) -> BitLinear:
    """A float64 BitLinear with random weights, norm gain and bias (so no parameter is at its init)."""
    lin = BitLinear(n_in, n_out, bias, input_norm=input_norm).double()
    with torch.no_grad():
        lin.weight.normal_(0, 0.05)
        if input_norm:
            lin.norm.weight.uniform_(0.5, 1.5)
        if bias:
            lin.bias.normal_()
    return lin


@pytest.mark.parametrize("input_norm,bias", [(False, False), (True, True)])
def test_forward_equals_the_formula_in_float64(input_norm, bias):
    torch.manual_seed(0)
    lin = random_bitlinear(37, 19, bias, input_norm)
    x = torch.randn(3, 7, 37, dtype=torch.float64)
    g = lin.norm.weight if input_norm else None
    torch.testing.assert_close(lin(x), formula(x, lin.weight.detach(), g, bias=lin.bias), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("input_norm", [False, True])
def test_quantized_topk_is_mask_of_real_input_applied_to_quantized_input(input_norm):
    torch.manual_seed(1)
    lin = random_bitlinear(41, 23, False, input_norm)
    proj = Projection("qkv", TopK(41, 13), lin, 41, 23)
    x = torch.randn(5, 41, dtype=torch.float64)
    g = lin.norm.weight if input_norm else None
    want = formula(x, lin.weight.detach(), g, mask=reference_topk(13))
    torch.testing.assert_close(proj(x), want, rtol=1e-12, atol=1e-12)


def test_straight_through_gradients():
    torch.manual_seed(2)
    lin = BitLinear(16, 8, False, input_norm=False).double()
    x = torch.randn(4, 16, dtype=torch.float64, requires_grad=True)
    g = torch.randn(4, 8, dtype=torch.float64)
    lin(x).backward(g)
    beta = lin.weight.detach().abs().mean() + 1e-5
    wq = torch.clamp(torch.round(lin.weight.detach() / beta), -1, 1) * beta
    s = 127.0 / x.detach().abs().amax(-1, keepdim=True)
    xq = torch.clamp(torch.round(x.detach() * s), -128, 127) / s
    torch.testing.assert_close(x.grad, g @ wq)      # d/dx passes straight through Q(x)
    torch.testing.assert_close(lin.weight.grad, g.T @ xq)  # d/dW passes straight through W̃β


def test_packing_round_trip_every_ternary_pattern():
    patterns = torch.tensor(list(itertools.product((-1, 0, 1), repeat=4)), dtype=torch.int8).T  # [4, 81]
    for out in range(1, 10):
        w = patterns.repeat(3, 1)[:out]
        packed = pack_ternary(w)
        assert packed.dtype == torch.uint8 and packed.shape == (81, -(-out // 4))
        assert torch.equal(unpack_ternary(packed, out), w)
    torch.manual_seed(3)
    for out, inn in [(1, 1), (7, 13), (33, 5), (130, 67)]:
        w = torch.randint(-1, 2, (out, inn), dtype=torch.int8)
        assert torch.equal(unpack_ternary(pack_ternary(w), out), w)


def test_frozen_projection_stores_the_packed_ternary_weight_and_beta():
    torch.manual_seed(5)
    lin = BitLinear(13, 7, True, input_norm=False)
    beta = lin.weight.detach().abs().mean() + 1e-5
    w = torch.clamp(torch.round(lin.weight.detach() / beta), -1, 1).to(torch.int8)
    lin.freeze()
    assert lin.packed.shape == (13, 2) and lin.packed.dtype == torch.uint8
    assert torch.equal(unpack_ternary(lin.packed, 7), w)
    torch.testing.assert_close(lin.scale, beta.reshape(1))
    assert lin.inference_nbytes() == 13 * 2 + 4 + 7 * 4


def tiny(name, *overrides):
    return zoo.load_recipe(RECIPES / f"tiny/{name}.toml", ["model.n_layers=2", "model.d_model=64", "model.n_heads=4",
                                                          "model.ffn.hidden=96", *overrides])


@pytest.mark.parametrize("name,dtype", [("bitnet", "float32"), ("bitnet-qsparse", "float32"),
                                        ("bitnet-qsparse", "bfloat16")])
def test_frozen_model_matches_training_forward_and_round_trips(name, dtype, tmp_path):
    torch.manual_seed(4)
    model = zoo.build(tiny(name, f"model.dtype={dtype}"))
    idx = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        before = model(idx).logits
        model.freeze()
        after = model(idx).logits
    torch.testing.assert_close(after, before, rtol=1e-6, atol=1e-6)  # same W̃β, same Q(x): exact here
    assert model.zoo_transforms == ["freeze"]
    assert not any("linear.weight" in n for n, _ in model.named_parameters())
    zoo.save(model, tmp_path / "ck")
    loaded = zoo.load(tmp_path / "ck")
    packed = loaded.blocks[0].attn.qkv.linear.packed
    assert packed.dtype == torch.uint8 and packed.shape == (64, -(-3 * 64 // 4))
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx).logits, after, rtol=0, atol=0)


@pytest.mark.parametrize("scale", ["matrix", "row"])
def test_packed_file_is_two_bits_a_weight_plus_beta(tmp_path, scale):
    """2 bits a weight plus β: one per matrix (4 bytes), or one per output row (4 bytes a row)."""
    model = zoo.build(tiny("bitnet", f"model.weights.scale='{scale}'"))
    zoo.save(model, tmp_path / "fp32")
    zoo.save(model.freeze(), tmp_path / "packed")

    def projection_bytes(folder):
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            sizes = {k: f.get_slice(k).get_shape() for k in f.keys()}
            types = {k: f.get_slice(k).get_dtype() for k in f.keys()}
        width = {"F32": 4, "U8": 1}
        return sum(torch.Size(s).numel() * width[types[k]] for k, s in sizes.items()
                   if ".linear." in k and ".norm." not in k)

    fp32, packed = projection_bytes(tmp_path / "fp32"), projection_bytes(tmp_path / "packed")
    if scale == "matrix":
        assert packed <= fp32 / 14
    else:  # 2 bits a weight, < one padding byte row (in bytes) a matrix, and a float32 β a row
        mats = [m for m in model.modules() if isinstance(m, BitLinear)]
        assert packed <= fp32 / 16 + sum(m.in_features + 4 * m.out_features for m in mats)
    acc = zoo.account(model)
    assert acc.projection_bytes == packed and acc.projection_bytes_fp32 == fp32
    assert acc.projection_bytes_inference == packed
    assert acc.inference_storage_ratio == pytest.approx(packed / fp32)
    assert acc.embedding_bytes == 256 * 64 * 4  # tied embedding/head, full precision


def test_embedding_and_head_stay_full_precision():
    model = zoo.build(tiny("bitnet")).freeze()
    assert model.embed.weight.dtype == torch.float32 and isinstance(model.head.weight, torch.nn.Parameter)
    assert all(type(b.attn_norm).__name__ == "Identity" for b in model.blocks)  # pre-norms dropped


@pytest.mark.parametrize("name", ["bitnet", "moe-bitnet-qsparse"])
def test_accounted_inference_bytes_are_what_freeze_holds(name):
    model = zoo.build(zoo.load_recipe(RECIPES / f"tiny/{name}.toml", ["model.n_layers=1"]))
    predicted = zoo.account(model).projection_bytes_inference
    assert zoo.account(model.freeze()).projection_bytes == predicted


@needs_cxx
@pytest.mark.parametrize("sparsity", [[], ["model.sparsity.kind='topk'", "model.sparsity.keep=0.5"]])
def test_cpu_decode_reads_the_packed_two_bits(sparsity):
    """On CPU a frozen BitNet projection decodes one row from the checkpoint's packed bytes (2 bits a weight:
    at most 1/14 of fp32's bytes per token, β aside), with the output of the batched int8 path row by row."""
    from zoo.blocks.bitnet import TernaryLinear
    from zoo.kernels import prepare_inference

    torch.manual_seed(0)
    model = prepare_inference(zoo.build(tiny("bitnet", *sparsity)).freeze())
    forms = [m.linear for m in model.modules() if isinstance(m, Projection)]
    assert forms and all(isinstance(f, TernaryLinear) and f.layout == "rows" for f in forms)
    for f in forms:
        kept = f.kept or f.in_features
        assert f.bytes_per_token() == kept * f.packed.shape[1] + f.scale.numel() * 4
        assert f.bytes_per_token() - f.scale.numel() * 4 <= kept * f.out_features * 4 / 14 + kept  # + padding
        x = torch.randn(3, f.in_features)
        sparsify = next(p.sparsify for p in model.modules() if isinstance(p, Projection) and p.linear is f)
        batched = f(x, sparsify)
        rows = torch.cat([f(x[i:i + 1], sparsify) for i in range(3)])
        assert f.fused(x[:1], sparsify)  # one row: the packed ternary_gemv
        torch.testing.assert_close(rows, batched, rtol=1e-6, atol=1e-6)
