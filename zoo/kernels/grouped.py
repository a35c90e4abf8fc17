"""Grouped matmul for mixture-of-experts: rows sorted by expert, one weight matrix per expert.

One API, for the kernels here and for every `kernel-backend` (docs/moe.md):

    grouped_mm(x, w, offsets, rows=None) -> y
    x        [N, in]        rows sorted by expert (expert 0's rows first, then expert 1's, ...);
                            with `rows`: [T, in] tokens in any order
    w        [E, out, in]   one weight matrix per expert (the nn.Linear layout, stacked)
    offsets  [E] int32      cumulative row counts: expert e owns rows offsets[e-1]:offsets[e]
    rows     [N] int64      or None: sorted row r is x[rows[r]] (a backend may fuse this gather)
    y        [N, out]       y[r] = x[rows[r]] · w[e(r)]ᵀ (x[r] without rows); differentiable in x and w

Empty experts (equal consecutive offsets) are allowed; offsets[-1] == N. A backend may also offer

    grouped_mm_split(x, w, offsets, sizes, rows=None) -> (y_1, ..., y_len(sizes))

equal to `grouped_mm(...).split(sizes, -1)` but free to return separate contiguous tensors (a GLU's
gate and up); a backend that does not override it (zoo.contracts.KernelBackend) gets that split.

Implementations: `grouped_mm_reference` (the definition), `grouped_mm_loop` (one matmul per expert),
`grouped_mm_torch` (`torch._grouped_mm` where it takes the operands), `grouped_mm_triton` (the
dropless Triton kernel: it gathers the token rows itself, walks blocks of rows that each belong to
one expert, no padding to a capacity; forward and backward), and `grouped_mm(..., impl=)` choosing.
`sort_by_expert` turns router choices into `rows` and `offsets`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from zoo.kernels.dispatch import choose, triton_module

GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def gather_rows(x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """x[rows] (x itself when rows is None): the expert-sorted rows, for backends that do not fuse the gather."""
    return x if rows is None else x.index_select(0, rows)


def _expert_rows(x: torch.Tensor, rows: torch.Tensor | None, s: int, t: int) -> torch.Tensor:
    """Sorted rows s:t: a slice of x, or (with `rows`) those tokens gathered into a small block."""
    return x[s:t] if rows is None else x.index_select(0, rows[s:t])


class _GroupedMatmulLoop(torch.autograd.Function):
    """y_i = x[rows] · w[e(row), block i]ᵀ for blocks of `sizes` output rows of each expert's weight: one
    matmul per expert and block, written into separate contiguous outputs. With `rows` each expert gathers its
    token rows into a block of its own (cache-sized; no [N, in] copy of the input is kept) and backward adds
    its rows' dx back to their tokens (`index_add_`, one expert at a time, in a fixed order). dx and dw are
    written in place per expert (dw in the weight's own layout, an empty expert's dw zero): nothing is
    concatenated or copied."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, sizes: tuple[int, ...],
                rows: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        ends = offsets.tolist()
        ctx.bounds, ctx.sizes = list(zip([0, *ends[:-1]], ends)), sizes
        ctx.save_for_backward(x, w, rows)
        n = x.shape[0] if rows is None else rows.shape[0]
        ys = tuple(x.new_empty(n, size) for size in sizes)
        for e, (s, t) in enumerate(ctx.bounds):
            if s == t:
                continue  # an empty expert writes nothing (at decode most of them are)
            xe = _expert_rows(x, rows, s, t)
            for y, part in zip(ys, w[e].split(sizes)):
                torch.mm(xe, part.T, out=y[s:t])
        return ys

    @staticmethod
    def backward(ctx, *dys: torch.Tensor):
        x, w, rows = ctx.saved_tensors
        dx = None if not ctx.needs_input_grad[0] else torch.empty_like(x) if rows is None else torch.zeros_like(x)
        dw = torch.empty_like(w) if ctx.needs_input_grad[1] else None
        for e, (s, t) in enumerate(ctx.bounds):
            parts = w[e].split(ctx.sizes)
            if dx is not None:
                dxe = dx[s:t] if rows is None else x.new_empty(t - s, x.shape[1])
                torch.mm(dys[0][s:t], parts[0], out=dxe)
                for dy, part in zip(dys[1:], parts[1:]):
                    dxe.addmm_(dy[s:t], part)
                if rows is not None:
                    dx.index_add_(0, rows[s:t], dxe)
            if dw is not None:
                xe = _expert_rows(x, rows, s, t)
                for dwi, dy in zip(dw[e].split(ctx.sizes), dys):
                    torch.mm(dy[s:t].T, xe, out=dwi)
        return dx, dw, None, None, None


def grouped_mm_loop(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor,
                    rows: torch.Tensor | None = None) -> torch.Tensor:
    """The `grouped_mm` contract as one matmul per expert (any dtype, any device; `rows` gathered per expert)."""
    return _GroupedMatmulLoop.apply(x, w, offsets, (w.shape[1],), rows)[0]


def grouped_mm_split(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, sizes: Sequence[int],
                     rows: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """`grouped_mm_loop(x, w, offsets, rows).split(sizes, -1)` as separate contiguous tensors (a GLU's gate and
    up): no strided parts forward, no concatenation of their gradients backward."""
    return _GroupedMatmulLoop.apply(x, w, offsets, tuple(sizes), rows)


def grouped_mm_supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether `torch._grouped_mm` runs on these operands (it needs rows aligned to 16 bytes)."""
    if not hasattr(torch, "_grouped_mm") or x.dtype != w.dtype or x.dtype not in GROUPED_MM_DTYPES:
        return False
    if x.device.type == "cuda" and x.dtype != torch.bfloat16:
        return False
    size = x.element_size()
    return (w.shape[-1] * size) % 16 == 0 and (w.shape[-2] * size) % 16 == 0


def grouped_mm_torch(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor,
                     rows: torch.Tensor | None = None) -> torch.Tensor:
    """`torch._grouped_mm` (on the gathered rows) where it supports the dtype and alignment, else the loop.

    On CPU `torch._grouped_mm` is the same loop in C++ (one `mm` per group written into one output),
    and its backward writes the weight gradient in the weight's own layout: fwd+bwd at dense speed.
    (It ran twice as fast as the per-expert loop at OLMoE shapes on the 2-core development CPU.)
    """
    if grouped_mm_supported(x, w):
        return torch._grouped_mm(gather_rows(x, rows), w.transpose(-2, -1), offs=offsets)
    return grouped_mm_loop(x, w, offsets, rows)


def grouped_mm_triton(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor,
                      rows: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton kernel (CUDA, or CPU under TRITON_INTERPRET=1); it reads w as its [E, in, out] transposed
    view (no copy) and the expert starts [0, offsets...]."""
    starts = torch.zeros(offsets.numel() + 1, dtype=torch.int64, device=offsets.device)
    starts[1:] = offsets
    return triton_module("triton_moe", x.device).GroupedMatmul.apply(x, w.transpose(1, 2), rows, starts)


def grouped_mm_reference(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor,
                         rows: torch.Tensor | None = None) -> torch.Tensor:
    """The definition, in plain torch (differentiable): one gathered matmul per expert, concatenated."""
    bounds = [0, *offsets.tolist()]
    ys = [_expert_rows(x, rows, s, t) @ w[e].T for e, (s, t) in enumerate(zip(bounds, bounds[1:]))]
    return torch.cat(ys) if ys else x.new_zeros(0, w.shape[1])


IMPLS = {"reference": grouped_mm_reference, "loop": grouped_mm_loop, "torch": grouped_mm_torch,
         "triton": grouped_mm_triton}


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, rows: torch.Tensor | None = None,
               impl: str = "auto") -> torch.Tensor:
    """y [N, out] (see the module doc); differentiable in x and w.

    `impl`: 'auto' (Triton on CUDA, else torch), 'reference', 'loop', 'torch', 'triton'.
    """
    if impl not in ("auto", *IMPLS):
        raise ValueError(f"impl must be one of {('auto', *IMPLS)}, got {impl!r}")
    return IMPLS[impl if impl == "loop" else choose(impl, x.device)](x, w, offsets, rows)


def sort_by_expert(expert_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From router choices [T, top_k]: (order, rows, offsets) for `grouped_mm`.

    `order` [T·top_k] sorts the flattened assignments by expert (stable), `rows = order // top_k`
    their token rows, `offsets` [E] int32 the end of each expert's run (empty experts included).
    """
    flat = expert_ids.flatten()
    order = torch.argsort(flat, stable=True)
    offsets = torch.cumsum(torch.bincount(flat, minlength=num_experts), 0).to(torch.int32)
    return order, order // expert_ids.shape[-1], offsets
