"""Moving MoE rows between token order and expert order, with gather-only backward passes.

Pair p = (token p // k, choice p % k). The experts see the R kept pairs as rows sorted by
expert (packed, no padding): expert e owns rows offsets[e-1]:offsets[e]. A `RowLayout` maps
both ways: `row_of_pair` [T·k] (a pair dropped over capacity has none) and `pair_of_row` [R].
Forward and backward are both gathers (a permutation's adjoint is its inverse), so nothing
accumulates with atomics and results are deterministic.

`GatheredRows` is the experts' input before that gather: an expert projection hands the tokens
and each row's token to the kernel backend, which gathers inside its grouped matmul.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_map_only


@dataclass
class RowLayout:
    """Where each (token, expert) pair sits among the experts' rows, and back."""

    row_of_pair: torch.Tensor  # [T·k] row of pair p (any valid index where dropped)
    dropped: torch.Tensor  # pairs without a row (over capacity)
    pair_of_row: torch.Tensor  # [R] pair of row r
    offsets: torch.Tensor  # [E] int32 cumulative rows per expert
    row_expert: torch.Tensor  # [R] expert of each row

    @classmethod
    def build(cls, expert: torch.Tensor, order: torch.Tensor, counts: torch.Tensor) -> RowLayout:
        """`expert`: each pair's expert; `order`: the kept pairs sorted by expert; `counts`: kept pairs per expert."""
        dev, n = expert.device, order.numel()
        row_of_pair = torch.zeros_like(expert)
        row_of_pair[order] = torch.arange(n, device=dev)
        has_row = torch.zeros(expert.numel(), dtype=torch.bool, device=dev)
        has_row[order] = True
        return cls(row_of_pair, (~has_row).nonzero().squeeze(1), order, torch.cumsum(counts, 0).to(torch.int32),
                   torch.repeat_interleave(torch.arange(counts.numel(), device=dev), counts))


def _gather(x: torch.Tensor, index: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """x[index] with the rows listed in `zero` set to 0 (x may have no rows: every index is then in `zero`)."""
    if x.shape[0] == 0:
        return x.new_zeros(index.shape[0], *x.shape[1:])
    out = x.index_select(0, index)
    return out.index_fill_(0, zero, 0) if zero.numel() else out


def _sum_pairs(rows: torch.Tensor, layout: RowLayout, k: int, gates: torch.Tensor | None = None) -> torch.Tensor:
    """out[t] = Σ_j gates[t, j] · rows[row_of_pair[t·k + j]] (gates 1 if None; dropped pairs add 0), in one pass:
    `embedding_bag` gathers and sums each token's k rows without a [T·k, D] intermediate."""
    T = layout.row_of_pair.numel() // k
    if rows.shape[0] == 0:  # every pair dropped
        return rows.new_zeros(T, rows.shape[1])
    if layout.dropped.numel():
        gates = (torch.ones(T, k, dtype=rows.dtype, device=rows.device) if gates is None else gates).flatten()
        gates = gates.index_fill(0, layout.dropped, 0).view(T, k)
    return F.embedding_bag(layout.row_of_pair.view(T, k), rows, mode="sum", per_sample_weights=gates)


class _SortTokens(torch.autograd.Function):
    """rows[r] = x[pair_of_row[r] // k]; backward: dx[t] = Σ_j drows[row_of_pair[t·k + j]] (dropped: 0)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layout: RowLayout, k: int) -> torch.Tensor:
        ctx.layout, ctx.k = layout, k
        return x.index_select(0, layout.pair_of_row // k)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _sum_pairs(grad, ctx.layout, ctx.k), None, None


class _Combine(torch.autograd.Function):
    """y[t] = Σ_j gates[t, j] · rows[row_of_pair[t·k + j]]; backward by gathers: drows[r] = gate(r) · dy[token(r)],
    dgate[t, j] = dy[t] · rows[row_of_pair[t·k + j]] (0 for dropped pairs)."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, gates: torch.Tensor, layout: RowLayout) -> torch.Tensor:
        g = gates.to(rows.dtype)
        ctx.save_for_backward(rows, g)
        ctx.layout, ctx.gates_dtype = layout, gates.dtype
        return _sum_pairs(rows, layout, gates.shape[1], g)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        rows, g = ctx.saved_tensors
        pair_of_row = ctx.layout.pair_of_row
        dy_rows = dy.index_select(0, pair_of_row // g.shape[1])  # [R, D]: each row's token gradient
        dgates = g.new_zeros(g.numel())
        dgates[pair_of_row] = torch.bmm(dy_rows.unsqueeze(1), rows.unsqueeze(2)).flatten()
        drows = dy_rows.mul_(g.flatten().index_select(0, pair_of_row).unsqueeze(1))
        return drows, dgates.view_as(g).to(ctx.gates_dtype), None


class _UnsortRows(torch.autograd.Function):
    """pairs[p] = rows[row_of_pair[p]] (0 if dropped); backward: drows[r] = dpairs[pair_of_row[r]]."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, layout: RowLayout) -> torch.Tensor:
        ctx.layout = layout
        return _gather(rows, layout.row_of_pair, layout.dropped)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.index_select(0, ctx.layout.pair_of_row), None


def sort_tokens(x: torch.Tensor, layout: RowLayout, k: int) -> torch.Tensor:
    """The experts' input rows [R, D] from tokens x [T, D]."""
    return _SortTokens.apply(x, layout, k)


def unsort_rows(rows: torch.Tensor, layout: RowLayout) -> torch.Tensor:
    """The experts' output rows [R, D] back in pair order [T·k, D] (0 for dropped pairs)."""
    return _UnsortRows.apply(rows, layout)


def combine(rows: torch.Tensor, gates: torch.Tensor, layout: RowLayout) -> torch.Tensor:
    """y[t] = Σ_j gates[t, j] · rows[row_of_pair[t·k + j]]: expert outputs back in token order, weighted."""
    return _Combine.apply(rows, gates, layout)


# Tensor attributes a GatheredRows answers without gathering (it carries the rows' shape, dtype and device).
_METADATA = (torch.Tensor.shape.__get__, torch.Tensor.dtype.__get__, torch.Tensor.device.__get__,
             torch.Tensor.ndim.__get__, torch.Tensor.dim, torch.Tensor.size)


class GatheredRows(torch.Tensor):
    """The experts' input rows [R, D] (row r = tokens[token_of_row[r]]), not gathered yet.

    An `ExpertProjection` reads `tokens` and `token_of_row`: it applies the per-token input
    mask to the T tokens once and lets the kernel backend gather inside its grouped matmul.
    Any other use (every torch function or method, e.g. a plugin FFN's own ops) gathers first,
    once, with `sort_tokens`, so any FFN kind works as an expert.
    """

    @staticmethod
    def __new__(cls, tokens: torch.Tensor, layout: RowLayout, k: int) -> GatheredRows:
        shape = (layout.pair_of_row.numel(), tokens.shape[-1])
        rows = torch.Tensor._make_subclass(cls, tokens.new_empty(1).expand(shape))  # metadata only, no copy
        rows.tokens, rows.row_layout, rows.k, rows._gathered = tokens, layout, k, None
        return rows

    @property
    def token_of_row(self) -> torch.Tensor:
        """[R] the token each row copies."""
        return self.row_layout.pair_of_row // self.k

    def gather_like(self, t: torch.Tensor) -> torch.Tensor:
        """The rows of another per-token tensor t [T, *] in this layout (a permutation gather both ways)."""
        return sort_tokens(t, self.row_layout, self.k)

    def gathered(self) -> torch.Tensor:
        """The rows as a plain tensor (gathered on first use, then reused)."""
        if self._gathered is None:
            self._gathered = sort_tokens(self.tokens, self.row_layout, self.k)
        return self._gathered

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in _METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {}))
        args, kwargs = tree_map_only(GatheredRows, GatheredRows.gathered, (args, kwargs or {}))
        return func(*args, **kwargs)


def materialize(x: torch.Tensor) -> torch.Tensor:
    """`x` as a plain tensor: a `GatheredRows` gathered, anything else unchanged."""
    return x.gathered() if isinstance(x, GatheredRows) else x
