"""Triton kernel of the ternary matmul on 2-bit packed weights, with the optional top-K gather."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from zoo.kernels.dispatch import Tuned, split_k
from zoo.kernels.ternary import TernaryWeight, finish


@triton.jit
def _ternary_kernel(x_ptr, i_ptr, p_ptr, part_ptr, K, R, K_PER_SPLIT,
                    stride_xn, stride_in, stride_pk, stride_ps, stride_pn,
                    GATHER: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_J: tl.constexpr):
    """Program (row, byte-column block, split): int32 partial sums of the 4 outputs j + s·R held by each byte."""
    row, pid_j, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    js = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    j_ok = js < R
    acc0 = tl.zeros([BLOCK_J], dtype=tl.int32)
    acc1 = tl.zeros([BLOCK_J], dtype=tl.int32)
    acc2 = tl.zeros([BLOCK_J], dtype=tl.int32)
    acc3 = tl.zeros([BLOCK_J], dtype=tl.int32)
    k_begin = split * K_PER_SPLIT
    k_end = tl.minimum(k_begin + K_PER_SPLIT, K)
    for k0 in range(k_begin, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < k_end
        src = tl.load(i_ptr + row * stride_in + ks, mask=k_ok, other=0).to(tl.int64) if GATHER else ks.to(tl.int64)
        x = tl.load(x_ptr + row * stride_xn + ks, mask=k_ok, other=0).to(tl.int32)[:, None]
        p = tl.load(p_ptr + src[:, None] * stride_pk + js[None, :], mask=k_ok[:, None] & j_ok[None, :], other=85)
        p = p.to(tl.int32)  # 85 = 0b01010101: four zero weights
        acc0 += tl.sum(x * ((p & 3) - 1), axis=0)
        acc1 += tl.sum(x * (((p >> 2) & 3) - 1), axis=0)
        acc2 += tl.sum(x * (((p >> 4) & 3) - 1), axis=0)
        acc3 += tl.sum(x * (((p >> 6) & 3) - 1), axis=0)
    out = part_ptr + split * stride_ps + row * stride_pn + js
    tl.store(out, acc0, mask=j_ok)
    tl.store(out + R, acc1, mask=j_ok)
    tl.store(out + 2 * R, acc2, mask=j_ok)
    tl.store(out + 3 * R, acc3, mask=j_ok)


# (32, 64, 4) is not here: ptxas held it to 128 registers on sm_90 and it spilled (tests/test_triton_compile.py).
_CONFIGS = [triton.Config({"BLOCK_K": bk, "BLOCK_J": bj}, num_warps=w)
            for bk, bj, w in [(64, 64, 4), (32, 128, 4), (64, 128, 8), (16, 256, 8), (128, 32, 4)]]
_launch = Tuned(_ternary_kernel, _CONFIGS, key=["K", "R"], fixed={"BLOCK_K": 32, "BLOCK_J": 32})


def ternary_matmul(xq: torch.Tensor, weight: TernaryWeight, row_scale: torch.Tensor,
                   indices: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                   out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Triton twin of `ternary_matmul_reference` on the packed layout: int32 accumulation, split-K partials."""
    if weight.packed is None:
        raise ValueError("the Triton ternary kernel needs the packed layout")
    n, k = xq.shape
    r = weight.packed.shape[1]
    xq = xq.contiguous()
    splits = split_k(xq.device, n * triton.cdiv(r, 64), k)
    k_per_split = triton.cdiv(k, splits)
    part = torch.empty(splits, n, 4 * r, device=xq.device, dtype=torch.int32)
    idx = xq if indices is None else indices.contiguous()
    _launch[lambda meta: (n, triton.cdiv(r, meta["BLOCK_J"]), splits)](
        xq, idx, weight.packed, part, k, r, k_per_split,
        xq.stride(0), idx.stride(0), weight.packed.stride(0), part.stride(0), part.stride(1),
        GATHER=indices is not None)
    return finish(part.sum(0)[:, :weight.out_features], row_scale, bias, out_dtype)
