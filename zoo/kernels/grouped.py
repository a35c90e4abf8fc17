"""Grouped matmul for mixture-of-experts: rows sorted by expert, one weight matrix per expert.

The interface every `kernel-backend` implements (docs/moe.md):

    grouped_mm(x, w, offsets, rows=None) -> y
    x        [N, in]        rows sorted by expert (expert 0's rows first, then expert 1's, ...);
                            with `rows`: [T, in] tokens in any order
    w        [E, out, in]   one weight matrix per expert (the nn.Linear layout, stacked)
    offsets  [E] int32      cumulative row counts: expert e owns rows offsets[e-1]:offsets[e]
    rows     [N] int64      or None: sorted row r is x[rows[r]] (a backend may fuse this gather)
    y        [N, out]       y[r] = x[rows[r]] · w[e(r)]ᵀ (x[r] without rows); differentiable in x and w

Empty experts (equal consecutive offsets) are allowed; offsets[-1] == N.
"""

from __future__ import annotations

import torch

GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def gather_rows(x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """x[rows] (x itself when rows is None): the expert-sorted rows, for backends that do not fuse the gather."""
    return x if rows is None else x.index_select(0, rows)


def grouped_mm_loop(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Reference: one matmul per expert on its contiguous slice of rows (any dtype, any device)."""
    ends = offsets.tolist()
    starts = [0, *ends[:-1]]
    return torch.cat([x[s:e] @ w[i].T for i, (s, e) in enumerate(zip(starts, ends))])


def grouped_mm_supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether `torch._grouped_mm` runs on these operands (it needs rows aligned to 16 bytes)."""
    if not hasattr(torch, "_grouped_mm") or x.dtype != w.dtype or x.dtype not in GROUPED_MM_DTYPES:
        return False
    if x.device.type == "cuda" and x.dtype != torch.bfloat16:
        return False
    size = x.element_size()
    return (w.shape[-1] * size) % 16 == 0 and (w.shape[-2] * size) % 16 == 0


def grouped_mm_torch(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """`torch._grouped_mm` where it supports the dtype and alignment, else the per-expert loop.

    On CPU `torch._grouped_mm` is the same loop in C++ (one `mm` per group written into one output),
    and its backward writes the weight gradient in the weight's own layout: fwd+bwd at dense speed.
    """
    if grouped_mm_supported(x, w):
        return torch._grouped_mm(x, w.transpose(-2, -1), offs=offsets)
    return grouped_mm_loop(x, w, offsets)
