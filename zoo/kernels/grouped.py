"""Grouped matmul for mixture-of-experts: rows sorted by expert, one weight matrix per expert.

The interface every `kernel-backend` implements (docs/moe.md):

    grouped_mm(x, w, offsets) -> y
    x        [N, in]        rows sorted by expert (expert 0's rows first, then expert 1's, ...)
    w        [E, out, in]   one weight matrix per expert (the nn.Linear layout, stacked)
    offsets  [E] int32      cumulative row counts: expert e owns rows offsets[e-1]:offsets[e]
    y        [N, out]       y[r] = x[r] · w[e(r)]ᵀ; differentiable in x and w

Empty experts (equal consecutive offsets) are allowed; offsets[-1] == N.
"""

from __future__ import annotations

import torch

GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def grouped_mm_loop(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Reference: one matmul per expert on its contiguous slice of rows (any dtype, any device)."""
    ends = offsets.tolist()
    starts = [0, *ends[:-1]]
    return torch.cat([x[s:e] @ w[i].T for i, (s, e) in enumerate(zip(starts, ends))])


class _PaddedBmm(torch.autograd.Function):
    """Each expert's rows copied into a padded [E, C, in] block, one bmm, rows copied back.

    C is the largest group; backward is two bmm's on the same padded layout. `slot[r]` is row
    r's place in the padded block, `pad` the places no row fills (set to zero, never returned).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, slot: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        xp = _scatter_padded(x, slot, pad, w.shape[0])
        ctx.save_for_backward(xp, w, slot, pad)
        return torch.bmm(xp, w.transpose(1, 2)).flatten(0, 1).index_select(0, slot)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        xp, w, slot, pad = ctx.saved_tensors
        gp = _scatter_padded(grad, slot, pad, w.shape[0])
        dx = torch.bmm(gp, w).flatten(0, 1).index_select(0, slot)
        return dx, torch.bmm(gp.transpose(1, 2), xp), None, None


def _scatter_padded(x: torch.Tensor, slot: torch.Tensor, pad: torch.Tensor, groups: int) -> torch.Tensor:
    """x's rows at `slot` of a [groups, C, width] block whose `pad` rows are zero."""
    out = x.new_empty(slot.numel() + pad.numel(), x.shape[1]).index_copy_(0, slot, x).index_fill_(0, pad, 0)
    return out.view(groups, -1, x.shape[1])


def padded_layout(offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(slot, pad) for groups padded to the largest, C: slot[r] = e·C + (r - start of e) for row r
    of expert e; pad lists the E·C - N places left empty."""
    counts = torch.diff(offsets.long(), prepend=offsets.new_zeros(1, dtype=torch.long))
    expert = torch.repeat_interleave(torch.arange(len(counts), device=offsets.device), counts)
    capacity = int(counts.max()) if len(counts) else 0
    slot = expert * capacity + torch.arange(len(expert), device=offsets.device) - (offsets.long() - counts)[expert]
    empty = torch.ones(len(counts) * capacity, dtype=torch.bool, device=offsets.device)
    empty[slot] = False
    return slot, empty.nonzero().squeeze(1)


def grouped_mm_padded(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor,
                      layout: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Grouped matmul as one batched matmul over groups padded to the largest (any dtype).
    `layout` is `padded_layout(offsets)` when the caller already has it."""
    slot, pad = layout if layout is not None else padded_layout(offsets)
    return _PaddedBmm.apply(x, w, slot, pad)


def padding_factor(offsets: torch.Tensor, num_experts: int) -> float:
    """Rows of the padded layout per real row: E · max group / N (1.0 = perfectly balanced)."""
    n = int(offsets[-1])
    counts = torch.diff(offsets.long(), prepend=offsets.new_zeros(1, dtype=torch.long))
    return num_experts * int(counts.max()) / n if n else float("inf")


def grouped_mm_supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether `torch._grouped_mm` runs on these operands (it needs rows aligned to 16 bytes)."""
    if not hasattr(torch, "_grouped_mm") or x.dtype != w.dtype or x.dtype not in GROUPED_MM_DTYPES:
        return False
    if x.device.type == "cuda" and x.dtype != torch.bfloat16:
        return False
    size = x.element_size()
    return (w.shape[-1] * size) % 16 == 0 and (w.shape[-2] * size) % 16 == 0


def grouped_mm_torch(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """`torch._grouped_mm` where it supports the dtype and alignment, else the per-expert loop."""
    if grouped_mm_supported(x, w):
        return torch._grouped_mm(x, w.transpose(-2, -1), offs=offsets)
    return grouped_mm_loop(x, w, offsets)
