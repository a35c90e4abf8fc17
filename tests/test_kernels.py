"""Kernels against float64 references: Triton (interpreter on CPU) and the torch paths, odd sizes, poisoned outputs."""

import pytest
import torch

from zoo.kernels.grouped import grouped_mm, grouped_mm_reference, sort_by_expert
from zoo.kernels.ternary import (
    TernaryWeight,
    pack_ternary,
    quantize_rows,
    ternary_matmul,
    ternary_matmul_reference,
    unpack_ternary,
)
from zoo.kernels.topk_matmul import PARALLEL_MIN_WORK, bag_offsets, topk_matmul, topk_matmul_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
IMPLS = ["torch", "triton"]


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def sparse_rows(n: int, width: int, k: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, width, device=DEVICE, dtype=dtype)
    idx = x.abs().topk(k, dim=-1).indices
    return x.gather(-1, idx), idx


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n,width,out,k", [(1, 77, 53, 30), (5, 200, 130, 91), (3, 33, 255, 33)])
def test_topk_matmul_matches_float64(poison, impl, dtype, n, width, out, k):
    vals, idx = sparse_rows(n, width, k, dtype)
    wt = torch.randn(width, out, device=DEVICE, dtype=dtype)
    bias = torch.randn(out, device=DEVICE, dtype=dtype)
    ref = topk_matmul_reference(vals.double(), idx, wt.double(), bias.double())
    y = topk_matmul(vals, idx, wt, bias, impl=impl)
    assert y.shape == (n, out) and y.dtype == dtype
    assert rel_err(y, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topk_matmul_torch_split_into_bags_matches_float64(poison, dtype):
    """A decode row large enough to be cut into bags over threads (summed after), odd sizes."""
    n, width, out, k = 1, 1501, 1601, 733
    assert n * k * out >= PARALLEL_MIN_WORK
    assert bag_offsets(n, k, out, torch.get_num_threads(), torch.device("cpu")).numel() > 1
    x = torch.randn(n, width, dtype=dtype)
    idx = x.abs().topk(k, dim=-1).indices.sort(-1).values
    vals, wt, bias = x.gather(-1, idx), torch.randn(width, out, dtype=dtype), torch.randn(out, dtype=dtype)
    ref = topk_matmul_reference(vals.double(), idx, wt.double(), bias.double())
    y = topk_matmul(vals, idx, wt, bias, impl="torch")
    assert y.shape == (n, out) and y.dtype == dtype
    assert rel_err(y, ref) < TOL[dtype]


def routed(tokens: int, experts: int, top_k: int) -> torch.Tensor:
    """Random router choices with expert 0 empty and expert 1 holding exactly one token."""
    ids = torch.stack([torch.randperm(experts - 2, device=DEVICE)[:top_k] + 2 for _ in range(tokens)])
    ids[tokens // 2, 0] = 1
    return ids


def test_sort_by_expert():
    ids = routed(19, 7, 3)
    order, rows, offsets = sort_by_expert(ids, 7)
    counts = torch.bincount(ids.flatten(), minlength=7)
    assert offsets.dtype == torch.int32 and offsets.tolist() == torch.cumsum(counts, 0).tolist()
    assert counts[0] == 0 and counts[1] == 1
    experts = ids.flatten()[order]
    assert (experts[1:] >= experts[:-1]).all() and (rows == order // 3).all()


@pytest.mark.parametrize("impl", ["loop", *IMPLS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tokens,d_in,d_out,experts,top_k,gather",
                         [(37, 45, 51, 6, 2, True), (70, 24, 19, 9, 1, False)])
def test_grouped_mm_forward_backward(poison, impl, dtype, tokens, d_in, d_out, experts, top_k, gather):
    """gather: x holds tokens, the kernel gathers rows; else x holds the rows already sorted (rows=None)."""
    _, rows, offsets = sort_by_expert(routed(tokens, experts, top_k), experts)
    if not gather:
        tokens, rows = rows.numel(), None
    x = torch.randn(tokens, d_in, device=DEVICE, dtype=dtype, requires_grad=True)
    w = torch.randn(experts, d_in, d_out, device=DEVICE, dtype=dtype).transpose(1, 2).requires_grad_()  # strided view
    g = torch.randn(int(offsets[-1]), d_out, device=DEVICE, dtype=dtype)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = grouped_mm_reference(x64, w64, offsets, rows)
    ref.backward(g.double())
    y = grouped_mm(x, w, offsets, rows, impl=impl)
    y.backward(g)
    assert rel_err(y, ref) < TOL[dtype]
    assert rel_err(x.grad, x64.grad) < TOL[dtype]
    assert rel_err(w.grad, w64.grad) < TOL[dtype]
    assert (w.grad[0] == 0).all()  # the empty expert gets a zero gradient, written


def test_grouped_mm_no_tokens():
    offsets = torch.zeros(3, dtype=torch.int32, device=DEVICE)
    x, w = torch.randn(0, 8, device=DEVICE), torch.randn(3, 5, 8, device=DEVICE)
    rows = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    assert grouped_mm(x, w, offsets, rows, impl="triton").shape == (0, 5)


@pytest.mark.parametrize("out", [1, 53, 256])
def test_pack_ternary_round_trip(out):
    w = torch.randint(-1, 2, (out, 37), device=DEVICE)
    packed = pack_ternary(w)
    assert packed.shape == (37, -(-out // 4)) and packed.dtype == torch.uint8
    assert (unpack_ternary(packed, out) == w).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("gather", [False, True])
@pytest.mark.parametrize("n,width,out", [(1, 77, 53), (6, 130, 201)])
def test_ternary_matmul_matches_float64(poison, impl, gather, n, width, out):
    w = TernaryWeight.from_ternary(torch.randint(-1, 2, (out, width), device=DEVICE))
    x = torch.randn(n, width, device=DEVICE)
    xq, s = quantize_rows(x)
    row_scale, bias = torch.rand(n, device=DEVICE) / s, torch.randn(out, device=DEVICE)
    idx = x.abs().topk(width // 2 + 1, dim=-1).indices if gather else None
    xin = xq.gather(-1, idx) if gather else xq
    ref = ternary_matmul_reference(xin, w, row_scale, idx, bias, torch.float64)
    y = ternary_matmul(xin, w, row_scale, idx, bias, torch.float32, impl=impl)
    assert rel_err(y, ref) < 1e-6


def test_quantize_rows_is_bitnet_absmax():
    x = torch.randn(4, 33)
    xq, s = quantize_rows(x)
    assert xq.dtype == torch.int8 and (xq.abs().amax(-1) == 127).all()
    assert torch.allclose(s, 127 / x.abs().amax(-1))


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 4])
def test_topk_matmul_bf16_autotuned_gpu(n):
    vals, idx = sparse_rows(n, 4096, 2048, torch.bfloat16)
    wt = torch.randn(4096, 11008, device=DEVICE, dtype=torch.bfloat16)
    ref = topk_matmul_reference(vals.double(), idx, wt.double())
    assert rel_err(topk_matmul(vals, idx, wt, impl="triton"), ref) < TOL[torch.bfloat16]


def triton_and_float64(x, w, g, offsets, rows):
    """(Triton, float64 reference) pairs of grouped_mm's output and its x and w gradients for upstream g."""
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = grouped_mm_reference(x64, w64, offsets, rows)
    ref.backward(g.double())
    y = grouped_mm(x, w, offsets, rows, impl="triton")
    y.backward(g)
    return [(y, ref), (x.grad, x64.grad), (w.grad, w64.grad)]


@pytest.mark.gpu
def test_grouped_mm_bf16_autotuned_gpu():
    _, rows, offsets = sort_by_expert(routed(2048, 16, 2), 16)
    x = torch.randn(2048, 1024, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(16, 768, 1024, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(rows.numel(), 768, device=DEVICE, dtype=torch.bfloat16)
    for a, b in triton_and_float64(x, w, g, offsets, rows):
        assert rel_err(a, b) < TOL[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("tf32", [False, True])
def test_grouped_mm_fp32_autotuned_gpu(monkeypatch, tf32):
    """fp32 on the card: without TF32 the autotuner tries only the FMA configs (larger tiles spill), with TF32 the
    tensor-core configs whose tiles fit shared memory (tests/test_triton_compile.py)."""
    from zoo.kernels import triton_moe

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", tf32)
    _, rows, offsets = sort_by_expert(routed(1000, 8, 2), 8)
    x = torch.randn(1000, 520, device=DEVICE, requires_grad=True)
    w = torch.randn(8, 392, 520, device=DEVICE, requires_grad=True)
    g = torch.randn(rows.numel(), 392, device=DEVICE)
    for a, b in triton_and_float64(x, w, g, offsets, rows):
        assert rel_err(a, b) < (5e-3 if tf32 else 1e-5)
    for tuned in (triton_moe._mm, triton_moe._dw):
        assert (tuned._autotuned.best_config in triton_moe._FMA) == (not tf32)


@pytest.mark.gpu
@pytest.mark.parametrize("gather", [False, True])
def test_ternary_matmul_large_gpu(gather):
    w = TernaryWeight.from_ternary(torch.randint(-1, 2, (11008, 4096), device=DEVICE), ("packed",))
    x = torch.randn(3, 4096, device=DEVICE)
    xq, s = quantize_rows(x)
    idx = x.abs().topk(2048, dim=-1).indices if gather else None
    xin = xq.gather(-1, idx) if gather else xq
    ref = ternary_matmul_reference(xin, w, 1 / s, idx, None, torch.float64)
    assert rel_err(ternary_matmul(xin, w, 1 / s, idx, impl="triton"), ref) < 1e-6


def test_triton_moe_backend_matches_torch_backend():
    """The registered `kernel-backend.triton` in a MoE model: same logits and gradients as `torch`."""
    import zoo
    from tests.conftest import RECIPES

    shape = ["model.n_layers=1", "model.d_model=40", "model.n_heads=4", "model.ffn.expert.hidden=24",
             "model.ffn.num_experts=5", "model.vocab_size=50"]
    models, ids = [], torch.randint(0, 50, (2, 7))
    for backend in ["torch", "triton"]:
        torch.manual_seed(0)
        models.append(zoo.build(zoo.load_recipe(RECIPES / "tiny/moe.toml", [*shape, f"model.ffn.backend='{backend}'"])))
    outs = []
    for m in models:
        out = m(ids, ids)
        out.loss.backward()
        outs.append(out)
    assert rel_err(outs[1].logits, outs[0].logits) < 1e-5
    for (name, a), (_, b) in zip(models[1].named_parameters(), models[0].named_parameters()):
        assert rel_err(a.grad, b.grad) < 1e-4, name
