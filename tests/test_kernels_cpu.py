"""zoo's compiled CPU kernels (zoo/kernels/csrc) against float64 references: odd sizes, every code
path of the C++ (one thread, column split, row split, several tiles, remainder rows), exact
top-K selection with ties, poisoned outputs, and the fallback when they cannot be built."""

import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import HAS_CXX as COMPILER
from tests.conftest import needs_cxx as needs_build
from zoo.blocks.sparsity import BlockTopK, TopK
from zoo.blocks.weights import TopKLinear, TransposedLinear
from zoo.kernels import cpu
from zoo.kernels.topk_matmul import topk_matmul, topk_matmul_reference

from .test_kernels import TOL, rel_err


def test_builds_wherever_there_is_a_compiler():
    """Where a compiler exists the kernels must build: a broken build must not hide behind the fallback."""
    if COMPILER:
        assert cpu.available(), cpu._load()


@pytest.fixture
def threads():
    """Run with 2 torch threads (the parallel paths), restoring the count after."""
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield 2
    torch.set_num_threads(old)


# (rows, in, out, k): one thread; several rows; k < 16 (remainder rows only); the column split
# over threads; the row split (narrow output); an output wider than one tile of accumulators.
# bf16 takes 8-row passes over 64-column segments: k 13 and 30 leave remainder rows, out 130 and
# 255 a remainder after whole segments, out 53 no whole segment
SHAPES = [(1, 77, 53, 30), (5, 200, 130, 91), (3, 33, 255, 13), (1, 1501, 4801, 733), (1, 2731, 1025, 1365),
          (2, 300, 9001, 150)]


@needs_build
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,width,out,k", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_gather_gemv_matches_float64(poison, threads, dtype, n, width, out, k, with_bias):
    x = torch.randn(n, width)
    idx = torch.stack([torch.randperm(width)[:k].sort().values for _ in range(n)])
    vals, wt = x.gather(-1, idx), torch.randn(width, out).to(dtype)
    bias = torch.randn(out) if with_bias else None
    ref = topk_matmul_reference(vals.double(), idx, wt.double(), None if bias is None else bias.double())
    y = cpu.gather_gemv(vals, idx, wt, bias)
    assert y.shape == (n, out) and y.dtype == torch.float32
    assert rel_err(y, ref) < TOL[torch.float32]  # fp32 accumulation of exactly-widened bf16 weights


@needs_build
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width,out", [(77, 53), (1501, 4801), (2731, 1025)])
def test_dense_gemv_matches_float64(poison, threads, dtype, width, out):
    x, wt, bias = torch.randn(1, width), torch.randn(width, out).to(dtype), torch.randn(out)
    ref = x.double() @ wt.double() + bias.double()
    assert rel_err(cpu.gather_gemv(x, None, wt, bias), ref) < TOL[torch.float32]


def sparse_rows(n: int, width: int, keep: float, band: int) -> torch.Tensor:
    """Rows about `keep` nonzero: the first all zero, the last with no zero outside the first `band`
    entries, which are zero in every row."""
    g = torch.Generator().manual_seed(n * width)
    x = torch.randn(n, width, generator=g) * (torch.rand(n, width, generator=g) < keep)
    x[-1] = torch.randn(width, generator=g)
    x[0], x[:, :band] = 0.0, 0.0
    return x


@needs_build
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,width,out", [(1, 37, 53), (4, 37, 53), (3, 1501, 4801), (3, 2731, 1025)])
@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9])
def test_dense_gemv_reads_only_the_rows_of_nonzero_inputs(poison, threads, dtype, n, width, out, keep):
    """Without indices, y = Σ_{i: x_i≠0} x_i · wt[i] (+ bias) for rows of any sparsity (all zero: the bias;
    no zero), in one call with rows of both kinds. The weight rows of zero inputs are never read: filled
    with NaN and inf they leave y finite (a kernel multiplying by them would give 0 · NaN = NaN)."""
    band = width // 5
    x, bias = sparse_rows(n, width, keep, band), torch.randn(out)
    wt = torch.randn(width, out).to(dtype)
    ref = x.double() @ wt.double() + bias.double()
    wt[:band] = float("nan")
    wt[band // 2:band, ::3] = float("inf")
    y = cpu.gather_gemv(x, None, wt, bias)
    assert y.isfinite().all()
    assert rel_err(y, ref) < TOL[torch.float32]  # fp32 accumulation of exactly-widened bf16 weights
    assert torch.equal(y[0], bias)


@needs_build
@pytest.mark.parametrize("n,width,out", [(1, 37, 53), (3, 2731, 1025)])
def test_int8_dense_gemv_skips_zero_inputs_exactly(poison, threads, n, width, out):
    """Ternary weights times integer activations holding zeros (quantized threshold-sparse rows): exact."""
    w = torch.randint(-1, 2, (width, out), dtype=torch.int8)
    x = (sparse_rows(n, width, 0.5, 3) * 40).round().clamp(-128, 127)
    assert torch.equal(cpu.gather_gemv(x, None, w).double(), x.double() @ w.double())


def tied_rows(n: int, width: int) -> torch.Tensor:
    """Rows full of ties at every magnitude (small integers, both signs), one all zero, one with NaN."""
    x = torch.randint(-3, 4, (n, width)).float()
    x[0] = 0.0
    x[-1, width // 3] = float("nan")
    return x


@needs_build
@pytest.mark.parametrize("n,width,out,k", [(4, 61, 37, 20), (3, 1024, 700, 512), (2, 2731, 1025, 1365)])
def test_topk_gemv_selects_exactly_what_the_block_keeps(poison, threads, n, width, out, k):
    for x in (torch.randn(n, width), tied_rows(n, width)):
        wt, bias = torch.randn(width, out), torch.randn(out)
        y, idx = cpu.topk_gemv(x, k, wt, bias)
        block = TopK(width, k)
        assert torch.equal(idx, block.kept_indices(x.abs().nan_to_num(float("inf")))), "not the block's entries"
        kept = block(x)  # the training path: x ⊙ mask
        finite = ~x.isnan().any(-1)
        ref = kept[finite].double() @ wt.double() + bias.double()
        assert rel_err(y[finite], ref) < TOL[torch.float32]
        assert y[~finite].isnan().all()  # a NaN input is kept and shows


@needs_build
def test_topk_matmul_auto_takes_the_compiled_kernel(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu, "gather_gemv", lambda *a: calls.append(a) or torch.zeros(1, 5))
    vals, idx, wt = torch.randn(1, 3), torch.tensor([[0, 2, 4]]), torch.randn(6, 5)
    topk_matmul(vals, idx, wt)
    assert len(calls) == 1
    topk_matmul(vals, idx, wt.half())  # fp16: not a compiled dtype, the torch path
    assert len(calls) == 1


@needs_build
def test_prepared_linears_use_the_compiled_kernels_and_match(poison):
    weight, bias = torch.randn(300, 257), torch.randn(300)
    x = torch.randn(1, 1, 257)
    lin = TransposedLinear(weight, bias)
    assert lin.compiled_gemv and not TransposedLinear(weight, bias, impl="torch").compiled_gemv
    ref = x.double() @ weight.double().t() + bias.double()
    assert rel_err(lin(x), ref) < TOL[torch.float32]
    top = TopKLinear(weight, bias, 100)
    block = TopK(257, 100)
    ref = block(x).double() @ weight.double().t() + bias.double()
    assert rel_err(top(x, block), ref) < TOL[torch.float32]
    nm = BlockTopK(256, 2, 4)  # not the row's top-K: the selection stays the block's own
    x = torch.randn(1, 256)
    top = TopKLinear(weight[:, :256], bias, 128)
    ref = nm(x).double() @ weight[:, :256].double().t() + bias.double()
    assert rel_err(top(x, nm), ref) < TOL[torch.float32]


FALLBACK = """
import torch
from zoo.errors import ZooError
from zoo.kernels import cpu
from zoo.blocks.weights import TopKLinear
from zoo.kernels.topk_matmul import topk_matmul
assert not cpu.available() and not cpu.available()  # asked twice: said once
w, x = torch.randn(40, 30), torch.randn(1, 30)
top = TopKLinear(w, None, 10)
assert not top.compiled_gemv
top(x)
try:
    topk_matmul(x[:, :10], torch.arange(10)[None], w.t().contiguous(), impl="cpu")
except ZooError as err:
    assert isinstance(err, cpu.CpuKernelsUnavailable)
    print("error:", err)
"""


@pytest.mark.parametrize("env,reason,said", [({"ZOO_CPU_KERNELS": "0"}, "ZOO_CPU_KERNELS=0", False),
                                             ({"CXX": "no-such-c++"}, "no C++ compiler (no-such-c++) on PATH", True)])
def test_without_the_compiled_kernels_everything_falls_back(tmp_path, env, reason, said):
    """Opted out (silently) or without a compiler (one stderr line, once): nothing is built, the torch
    paths run, and asking for impl='cpu' explicitly is a one-line ZooError naming the reason."""
    env = {**os.environ, **env, "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", FALLBACK], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"error: zoo's CPU kernels are not available: {reason}" in out.stdout
    line = f"zoo: CPU kernels not built ({reason}); using the pure-torch paths\n"
    assert out.stderr == (line if said else ""), out.stderr
    assert not list(tmp_path.iterdir())  # nothing was built


@needs_build
@pytest.mark.parametrize("n,width,out,k", [(1, 77, 53, 30), (3, 200, 130, 0), (1, 2731, 1025, 1365),
                                          (2, 300, 9001, 150)])
def test_int8_gather_gemv_is_exact(poison, threads, n, width, out, k):
    """Ternary weights times int8 activations: integer sums, equal to float64's exactly (fewer than 16
    rows, the row split, several tiles)."""
    w = torch.randint(-1, 2, (width, out), dtype=torch.int8)
    x = torch.randint(-128, 128, (n, width)).float()
    idx = torch.stack([torch.randperm(width)[:k].sort().values for _ in range(n)]) if k else None
    vals = x if idx is None else x.gather(-1, idx)
    ref = topk_matmul_reference(vals.double(), idx, w.double()) if k else x.double() @ w.double()
    assert torch.equal(cpu.gather_gemv(vals, idx, w).double(), ref)


@needs_build
@pytest.mark.parametrize("n,width,out,k", [(1, 77, 53, 30), (3, 200, 130, 0), (1, 2731, 1025, 1365),
                                          (2, 300, 9001, 150), (1, 33, 4 * 64, 0), (1, 47, 4 * 37 - 2, 0),
                                          (2, 19, 5, 0)])
def test_packed_ternary_gemv_is_exact(poison, threads, n, width, out, k):
    """The 2-bit packed layout (uint8 [in, ceil(out/4)], `pack_ternary`) read as is: integer sums equal to
    float64's exactly at the extremes of int8 — whole 32-byte blocks, a last block overlapping the one before,
    rows shorter than a block, remainder rows, the row split, several tiles — and zero padding columns."""
    from zoo.kernels.ternary import pack_ternary

    w = torch.randint(-1, 2, (out, width), dtype=torch.int8)
    packed = pack_ternary(w)
    for x in (torch.randint(-128, 128, (n, width)).float(), torch.full((n, width), -128.0),
              torch.full((n, width), 127.0)):
        idx = torch.stack([torch.randperm(width)[:k].sort().values for _ in range(n)]) if k else None
        vals = x if idx is None else x.gather(-1, idx)
        ref = topk_matmul_reference(vals.double(), idx, w.t().double()) if k else x.double() @ w.t().double()
        y = cpu.gather_gemv(vals, idx, packed)
        assert y.shape == (n, 4 * packed.shape[1]) and not y[:, out:].any()
        assert torch.equal(y[:, :out].double(), ref)


@needs_build
@pytest.mark.parametrize("k", [0, 1, 40, 101])
@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("layout", ["rows", "packed"])
def test_ternary_gemv_is_the_bitnet_projection(poison, threads, k, per_row, layout):
    """One call = top-K (optional) + absmax int8 quantization + exact ternary GEMV + 1/s · β + bias,
    as the torch ops compute it (rows full of ties included). Rows whose small entries quantize to 0 (row 0:
    two outliers; row 1: exactly 40 entries that do not) take the kernel's path without the selection where
    at most k entries are nonzero after quantization: the same sums."""
    from zoo.kernels.ternary import TernaryWeight, pack_ternary, quantize_rows, ternary_matmul_reference

    width, out = 101, 67
    sparse = torch.randn(2, width) * 1e-4
    sparse[0, 5], sparse[0, 50] = 10.0, -7.0
    sparse[1, torch.randperm(width)[:40]] = torch.randn(40).sign() * (1 + torch.rand(40))
    for x in (torch.randn(2, width), tied_rows(2, width)[:, :width].nan_to_num(0.0), sparse):
        w = torch.randint(-1, 2, (out, width))
        beta = torch.rand(out if per_row else 1) + 0.5
        bias = torch.randn(out)
        kept = TopK(width, k)(x) if k else x
        xq, s = quantize_rows(kept)
        ref = ternary_matmul_reference(xq, TernaryWeight.from_ternary(w, ("int8",)), 1 / s).double() * beta.double()
        ref = ref + bias.double()
        if layout == "rows":
            y = cpu.ternary_gemv(x, k, w.to(torch.int8).t().contiguous(), beta, bias)
        else:
            y = cpu.ternary_gemv(x, k, pack_ternary(w), beta, bias, out_features=out)
        assert rel_err(y, ref) < 1e-6



@needs_build
@pytest.mark.parametrize("n,k", [(1, 0), (1, 37), (3, 0), (3, 37)])
@pytest.mark.parametrize("layouts", [("rows",), ("rows", "packed")])
def test_ternary_matmul_cpu_on_the_rows_layout(poison, n, k, layouts):
    """ternary_matmul impl='cpu' (auto with the rows layout): one row through the compiled GEMV (on the
    packed bytes when held), more rows through torch._int_mm on the [in, out] rows; exact before the scales."""
    from zoo.kernels.ternary import TernaryWeight, quantize_rows, ternary_matmul, ternary_matmul_reference

    width, out = 90, 41
    w = torch.randint(-1, 2, (out, width))
    tw = TernaryWeight.from_ternary(w, layouts)
    assert tw.int8 is None and tw.rows.shape == (width, out)
    xq, s = quantize_rows(torch.randn(n, width))
    idx = xq.float().abs().topk(k, dim=-1).indices if k else None
    xk = xq if idx is None else xq.gather(-1, idx)
    ref = ternary_matmul_reference(xk, tw, 1 / s, idx)
    for impl in ("cpu", "auto", "torch"):
        assert rel_err(ternary_matmul(xk, tw, 1 / s, idx, impl=impl), ref) < 1e-6


@needs_build
def test_gather_gemv_rejects_an_index_out_of_range():
    """A bad index is an error, not a read outside the weight."""
    wt = torch.randn(10, 7)
    for bad in (10, -1):
        with pytest.raises(RuntimeError, match="out of range"):
            cpu.gather_gemv(torch.randn(1, 2), torch.tensor([[0, bad]]), wt)


@needs_build
def test_transposed_linear_with_sparse_inputs_takes_the_skipping_gemv_while_it_pays(monkeypatch):
    """A `zeros_inputs` keep (threshold) sends rows · keep < 1 rows through the compiled GEMV (which skips the
    zeros), more rows through `x @ Wt`; both give the float64 product, and `bytes_per_token` counts keep · in rows."""
    weight, bias = torch.randn(53, 37), torch.randn(53)
    lin, calls = TransposedLinear(weight, bias, keep=0.3), []
    real = cpu.gather_gemv
    monkeypatch.setattr(cpu, "gather_gemv", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    for n in (1, 3, 4):
        x = sparse_rows(n + 1, 37, 0.3, 4)[1:]  # no all-zero row
        ref = x.double() @ weight.double().t() + bias.double()
        assert rel_err(lin(x), ref) < TOL[torch.float32]
    assert calls == [1, 3]  # 4 rows · 0.3 >= 1: the dense matmul
    assert lin.bytes_per_token() == round(0.3 * 37) * 53 * 4 + 53 * 4


def attention_float64(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q·kᵀ/√D)·v in float64, each key/value head repeated for its H/KVH query heads."""
    g = q.shape[1] // k.shape[1]
    k, v = (z.double().repeat_interleave(g, 1) for z in (k, v))
    s = q.double() @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    return s.softmax(-1) @ v


# (B, H, KVH, L, D): one key; grouped-query (G 3) over odd lengths; multi-head (G 1); more work than
# PARALLEL_MIN_WORK (the groups split over threads); an odd head size with no whole vector
ATTENTION_SHAPES = [(1, 9, 3, 1, 64), (1, 9, 3, 37, 64), (2, 5, 5, 301, 24), (1, 12, 4, 1031, 64),
                    (3, 4, 2, 77, 19)]


@needs_build
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,h,kvh,length,d", ATTENTION_SHAPES)
def test_decode_attention_matches_float64(poison, threads, dtype, b, h, kvh, length, d):
    """The cache read in place (a slice of a longer preallocated one: strided) in its own dtype."""
    cache = torch.randn(2, b, kvh, length + 20, d).mul(3).to(dtype)  # scores up to ~±100: a peaked softmax
    k, v = cache[0, :, :, :length], cache[1, :, :, :length]
    q = torch.randn(b, 1, h, d).transpose(1, 2)  # as the block makes it: heads of one token, a strided view
    assert cpu.attends(q, k, v)
    y = cpu.decode_attention(q, k, v)
    assert y.shape == (b, h, 1, d) and y.dtype == torch.float32
    assert rel_err(y, attention_float64(q, k, v)) < 1e-5


@needs_build
def test_decode_attention_softmax_extremes():
    """Scores far apart (weights down to e^-87 and below), equal scores, and a NaN query head that stays NaN
    while the others are unaffected."""
    k = torch.tensor([[0.0, 40.0, -40.0, 40.0, 0.0]]).T.expand(5, 4).reshape(1, 1, 5, 4).contiguous()
    v = torch.randn(1, 1, 5, 4)
    q = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [float("nan"), 0, 0, 0]]).reshape(1, 3, 1, 4)
    y = cpu.decode_attention(q, k, v)
    ref = attention_float64(q, k, v)
    assert rel_err(y[:, :2], ref[:, :2]) < 1e-6
    assert torch.allclose(y[0, 1, 0], v[0, 0].mean(0), atol=1e-6)  # all scores equal: the mean of the values
    assert y[0, 2].isnan().all() and not y[:, :2].isnan().any()


def test_decode_attention_is_not_taken_where_a_gradient_is_needed():
    q = torch.randn(1, 2, 1, 8, requires_grad=True)
    k = v = torch.randn(1, 2, 5, 8)
    assert not cpu.attends(q, k, v)
    assert not cpu.attends(q.detach().expand(1, 2, 3, 8), k, v)  # several queries: SDPA with its mask


@pytest.mark.parametrize("fast", [True, False])
def test_ternary_int_mm_is_exact_either_way(fast, monkeypatch):
    """int8 × ternary through torch._int_mm, or through fp32 where _int_mm is slow: the same int32 sums,
    at the extremes of int8 (a row of -128s: the largest partial sums)."""
    from zoo.kernels.ternary import int_mm

    monkeypatch.setattr(cpu, "fast_matmul", lambda dtype: fast)
    x = torch.randint(-128, 128, (37, 1531), dtype=torch.int8)
    x[0] = -128
    w = torch.randint(-1, 2, (1531, 53), dtype=torch.int8)
    w[:, 0] = -1
    got = int_mm(x, w)
    assert got.dtype == torch.int32 and torch.equal(got, (x.long() @ w.long()).int())
    assert got[0, 0] == 128 * 1531


@pytest.mark.parametrize("fast", [True, False])
def test_half_matmul_either_way(fast, monkeypatch):
    """bf16 / fp16 batches through torch's half GEMM or through fp32 (rounded once): within half rounding."""
    monkeypatch.setattr(cpu, "fast_matmul", lambda dtype: fast)
    for dtype in (torch.bfloat16, torch.float16):
        a, b = torch.randn(33, 301).to(dtype), torch.randn(301, 77).to(dtype)
        got = cpu.matmul(a, b)
        assert got.dtype == dtype
        assert rel_err(got, a.double() @ b.double()) < 1e-2

