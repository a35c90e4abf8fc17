"""Triton kernels of the dropless MoE grouped matmul, forward and backward (imported only where Triton runs)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from zoo.kernels.dispatch import Tuned, interpreting


@triton.jit
def _grouped_mm_kernel(x_ptr, rows_ptr, w_ptr, y_ptr, blk_expert_ptr, blk_start_ptr, offsets_ptr, N_IN, N_OUT,
                       stride_xm, stride_xk, stride_we, stride_wk, stride_wn, stride_ym, stride_yn,
                       GATHER: tl.constexpr, PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (row block, column block): y[rows of the block] = x[gathered rows] · w[expert of the block]."""
    blk, pid_n = tl.program_id(0), tl.program_id(1)
    e = tl.load(blk_expert_ptr + blk)
    if e >= 0:
        start = tl.load(blk_start_ptr + blk)
        end = tl.load(offsets_ptr + e + 1)
        rm = start + tl.arange(0, BLOCK_M)
        m_ok = rm < end
        src = tl.load(rows_ptr + rm, mask=m_ok, other=0) if GATHER else rm
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N_OUT
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, N_IN, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            k_ok = rk < N_IN
            a = tl.load(x_ptr + src[:, None].to(tl.int64) * stride_xm + rk[None, :] * stride_xk,
                        mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w_ptr + e.to(tl.int64) * stride_we + rk[:, None] * stride_wk + rn[None, :] * stride_wn,
                        mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        tl.store(y_ptr + rm[:, None].to(tl.int64) * stride_ym + rn[None, :] * stride_yn,
                 acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _grouped_dw_kernel(x_ptr, rows_ptr, g_ptr, dw_ptr, offsets_ptr, N_IN, N_OUT,
                       stride_xm, stride_xk, stride_gm, stride_gn, stride_de, stride_dk, stride_dn,
                       GATHER: tl.constexpr, PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (expert, input block, output block): dw[e] = x[rows of e]ᵀ · g[rows of e] (0 for an empty expert)."""
    e, pid_k, pid_n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start = tl.load(offsets_ptr + e)
    end = tl.load(offsets_ptr + e + 1)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok, n_ok = rk < N_IN, rn < N_OUT
    acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        m_ok = rm < end
        src = (tl.load(rows_ptr + rm, mask=m_ok, other=0) if GATHER else rm).to(tl.int64)
        xt = tl.load(x_ptr + rk[:, None] * stride_xk + src[None, :] * stride_xm,
                     mask=k_ok[:, None] & m_ok[None, :], other=0.0)
        g = tl.load(g_ptr + rm[:, None].to(tl.int64) * stride_gm + rn[None, :] * stride_gn,
                    mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(xt, g, acc, input_precision=PRECISION)
    tl.store(dw_ptr + e.to(tl.int64) * stride_de + rk[:, None] * stride_dk + rn[None, :] * stride_dn,
             acc.to(dw_ptr.dtype.element_ty), mask=k_ok[:, None] & n_ok[None, :])


def _configs(sizes: list[tuple[int, int, int, int]]) -> list:
    return [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=st) for n, k, w, st in sizes]


# BLOCK_M is fixed (not tuned): the per-block expert table is built for it.
BLOCK_M = 16 if interpreting() else 64
SHARED_BUDGET = 163 * 1024  # bytes of shared memory per block on an A100: the smallest card (zoo/kernels/aot.py)
# fp32 without TF32 multiplies on the FMA units with both tiles in registers: larger tiles spill (kilobytes on sm_80),
# so it has its own small configs (PRECISION is in the autotune key: a TF32 choice is not reused for ieee). Every
# config is compiled for sm_80 and sm_90 by tests/test_triton_compile.py.
_FMA = _configs([(64, 32, 8, 3), (32, 32, 4, 3), (64, 16, 4, 3)])
_FIXED = {"BLOCK_N": 32, "BLOCK_K": 16}


def _fits(tile_elements):
    """`Tuned.fits` of a grouped kernel: ieee fp32 takes the `_FMA` configs; tensor-core dtypes (bf16, fp16, TF32) the
    others whose `num_stages` pipelined tiles (`tile_elements(config)` elements per stage; Triton allocates that many
    on sm_90, one stage less on sm_80) fit `SHARED_BUDGET`."""

    def fits(config, args: dict, constexprs: dict) -> bool:
        x = args["x_ptr"]
        if x.dtype == torch.float32 and constexprs["PRECISION"] == "ieee":
            return config in _FMA
        return config not in _FMA and config.num_stages * tile_elements(config) * x.element_size() <= SHARED_BUDGET

    return fits


def _mm_tiles(config) -> int:
    """x [BLOCK_M, BLOCK_K] and w [BLOCK_K, BLOCK_N]."""
    return BLOCK_M * config.kwargs["BLOCK_K"] + config.kwargs["BLOCK_K"] * config.kwargs["BLOCK_N"]


def _dw_tiles(config) -> int:
    """xᵀ [BLOCK_K, BLOCK_M] and g [BLOCK_M, BLOCK_N]."""
    return BLOCK_M * (config.kwargs["BLOCK_K"] + config.kwargs["BLOCK_N"])


_mm = Tuned(_grouped_mm_kernel, [*_configs([(128, 64, 4, 3), (64, 64, 4, 4), (256, 64, 8, 3), (128, 32, 4, 4),
                                            (128, 128, 8, 3)]), *_FMA],
            key=["N_IN", "N_OUT", "PRECISION"], fixed=_FIXED, fits=_fits(_mm_tiles))
_dw = Tuned(_grouped_dw_kernel, [*_configs([(128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 4, 4), (64, 128, 4, 3)]),
                                 *_FMA],
            key=["N_IN", "N_OUT", "PRECISION"], fixed=_FIXED, fits=_fits(_dw_tiles))


def _precision(dtype: torch.dtype) -> str:
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _block_table(offsets: torch.Tensor, n_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block expert id and first row, for blocks of BLOCK_M rows that never cross an expert boundary.

    No device sync: there are at most cdiv(rows, BLOCK_M) + E blocks; unused slots get expert -1.
    """
    counts = offsets[1:] - offsets[:-1]
    ends = torch.cumsum((counts + BLOCK_M - 1) // BLOCK_M, 0)
    slots = torch.arange(triton.cdiv(n_rows, BLOCK_M) + counts.numel(), device=offsets.device)
    expert = torch.searchsorted(ends, slots, right=True)
    used = expert < counts.numel()
    expert = expert.clamp(max=counts.numel() - 1)
    first = ends[expert] - (counts[expert] + BLOCK_M - 1) // BLOCK_M
    start = offsets[expert] + (slots - first) * BLOCK_M
    return torch.where(used, expert, -1), start


def _forward(x: torch.Tensor, w: torch.Tensor, rows: torch.Tensor | None, offsets: torch.Tensor,
             n_rows: int, out_dtype: torch.dtype) -> torch.Tensor:
    """y[r] = x[rows[r]] · w[e(r)] (x[r] when rows is None), r < n_rows; w may be any strided view."""
    y = torch.empty(n_rows, w.shape[2], device=x.device, dtype=out_dtype)
    if n_rows == 0:
        return y
    blk_expert, blk_start = _block_table(offsets, n_rows)
    _mm[lambda meta: (blk_expert.numel(), triton.cdiv(w.shape[2], meta["BLOCK_N"]))](
        x, x if rows is None else rows, w, y, blk_expert, blk_start, offsets, w.shape[1], w.shape[2],
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), w.stride(2), y.stride(0), y.stride(1),
        GATHER=rows is not None, PRECISION=_precision(x.dtype), BLOCK_M=BLOCK_M)
    return y


def _weight_grad(x: torch.Tensor, rows: torch.Tensor | None, g: torch.Tensor, offsets: torch.Tensor,
                 w: torch.Tensor) -> torch.Tensor:
    """dw[e] = x[rows of e]ᵀ · g[rows of e] (x of e when rows is None), in w's shape and dtype."""
    dw = torch.empty(w.shape, device=w.device, dtype=w.dtype)
    _dw[lambda meta: (w.shape[0], triton.cdiv(w.shape[1], meta["BLOCK_K"]), triton.cdiv(w.shape[2], meta["BLOCK_N"]))](
        x, x if rows is None else rows, g, dw, offsets, w.shape[1], w.shape[2], x.stride(0), x.stride(1),
        g.stride(0), g.stride(1), dw.stride(0), dw.stride(1), dw.stride(2),
        GATHER=rows is not None, PRECISION=_precision(x.dtype), BLOCK_M=BLOCK_M)
    return dw


class GroupedMatmul(torch.autograd.Function):
    """y[r] = x[rows[r]] · w[e(r)]; backward: dx by scatter-adding g·w[e]ᵀ (no atomics), dw per expert."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, rows: torch.Tensor | None,
                offsets: torch.Tensor) -> torch.Tensor:
        rows = None if rows is None else rows.contiguous()
        offsets = offsets.contiguous()
        ctx.save_for_backward(x, w, rows, offsets)
        n_rows = x.shape[0] if rows is None else rows.numel()
        return _forward(x, w.to(x.dtype), rows, offsets, n_rows, x.dtype)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, w, rows, offsets = ctx.saved_tensors
        dx = dw = None
        if ctx.needs_input_grad[0]:
            wt = w.to(g.dtype).transpose(1, 2)
            if rows is None:
                dx = _forward(g, wt, None, offsets, g.shape[0], x.dtype)
            else:
                g_x = _forward(g, wt, None, offsets, rows.numel(), torch.float32)
                dx = torch.zeros(x.shape, device=x.device, dtype=torch.float32).index_add_(0, rows, g_x).to(x.dtype)
        if ctx.needs_input_grad[1]:
            dw = _weight_grad(x, rows, g.to(x.dtype), offsets, w)
        return dx, dw, None, None
