"""Moving MoE rows between token order and expert order, with gather-only backward passes.

Pair p = (token p // k, choice p % k). `order` [N] lists the kept pairs sorted by expert (row r
of the expert-sorted input is pair order[r]); `slot` [T·k] is its inverse: the row of pair p,
or N for a pair dropped over capacity. Both directions are index_select in forward and in
backward (a permutation's adjoint is its inverse), so nothing accumulates with atomics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _zero_row_if_dropped(rows: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """`rows` with a zero row N appended when some pair was dropped (slot N), else `rows` itself."""
    return F.pad(rows, (0, 0, 0, 1)) if rows.shape[0] < slot.numel() else rows


class _SortTokens(torch.autograd.Function):
    """rows[r] = x[order[r] // k]; backward: dx[t] = Σ_j drows[slot[t·k + j]] (dropped pairs add 0)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, order: torch.Tensor, slot: torch.Tensor, k: int) -> torch.Tensor:
        ctx.save_for_backward(slot)
        ctx.k = k
        return x.index_select(0, order // k)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (slot,) = ctx.saved_tensors
        rows = _zero_row_if_dropped(grad, slot)
        return rows.index_select(0, slot).view(-1, ctx.k, grad.shape[-1]).sum(1), None, None, None


class _UnsortRows(torch.autograd.Function):
    """pairs[p] = rows[slot[p]] (zeros for a dropped pair); backward: drows[r] = dpairs[order[r]]."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, order: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(order)
        return _zero_row_if_dropped(rows, slot).index_select(0, slot)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (order,) = ctx.saved_tensors
        return grad.index_select(0, order), None, None


def sort_tokens(x: torch.Tensor, order: torch.Tensor, slot: torch.Tensor, k: int) -> torch.Tensor:
    """The expert-sorted input rows [N, D] of tokens x [T, D]."""
    return _SortTokens.apply(x, order, slot, k)


def combine(rows: torch.Tensor, gates: torch.Tensor, order: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """y[t] = Σ_j gates[t, j] · rows[slot[t·k + j]]: expert outputs [N, D] back in token order, weighted."""
    T, k = gates.shape
    pairs = _UnsortRows.apply(rows, order, slot).view(T, k, rows.shape[-1])
    return torch.bmm(gates.to(rows.dtype).unsqueeze(1), pairs).squeeze(1)
