"""Triton kernel of the top-K sparse-input matmul (imported only where Triton can run)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from zoo.kernels.dispatch import Tuned, split_k


@triton.jit
def _topk_matmul_kernel(v_ptr, i_ptr, w_ptr, part_ptr, K, OUT, K_PER_SPLIT,
                        stride_vn, stride_in, stride_wk, stride_ps, stride_pn,
                        BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program (row, column block, split): partial[split, row, cols] = Σ_k v[row, k] · wt[idx[row, k], cols]."""
    row, pid_n, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < OUT
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    k_begin = split * K_PER_SPLIT
    k_end = tl.minimum(k_begin + K_PER_SPLIT, K)
    for k0 in range(k_begin, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < k_end
        idx = tl.load(i_ptr + row * stride_in + ks, mask=k_ok, other=0).to(tl.int64)
        v = tl.load(v_ptr + row * stride_vn + ks, mask=k_ok, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + idx[:, None] * stride_wk + cols[None, :], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc += tl.sum(w.to(tl.float32) * v[:, None], axis=0)
    tl.store(part_ptr + split * stride_ps + row * stride_pn + cols, acc, mask=col_ok)


_CONFIGS = [triton.Config({"BLOCK_K": bk, "BLOCK_N": bn}, num_warps=w)
            for bk, bn, w in [(16, 256, 4), (32, 128, 4), (32, 256, 4), (64, 128, 8), (16, 512, 8), (8, 1024, 8)]]
_launch = Tuned(_topk_matmul_kernel, _CONFIGS, key=["K", "OUT"], fixed={"BLOCK_K": 16, "BLOCK_N": 32})


def topk_matmul(values: torch.Tensor, indices: torch.Tensor, wt: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """Triton twin of `topk_matmul_reference`: fp32 accumulation, split-K partials summed in fp32 (no atomics)."""
    n, k = values.shape
    out, dtype = wt.shape[1], values.dtype
    values, indices = values.to(wt.dtype).contiguous(), indices.contiguous()
    assert wt.stride(1) == 1, "wt must be row-major [in, out]"
    splits = split_k(values.device, n * triton.cdiv(out, 128), k)
    k_per_split = triton.cdiv(k, splits)
    part = torch.empty(splits, n, out, device=values.device, dtype=torch.float32)
    _launch[lambda meta: (n, triton.cdiv(out, meta["BLOCK_N"]), splits)](
        values, indices, wt, part, k, out, k_per_split,
        values.stride(0), indices.stride(0), wt.stride(0), part.stride(0), part.stride(1))
    y = part.sum(0)
    if bias is not None:
        y += bias.float()
    return y.to(dtype)
