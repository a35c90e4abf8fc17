"""Dropless MoE grouped matmul: each routed (token, expert) pair times its expert's weight.

Assignments are sorted by expert: `rows[r]` is the token row of x of the r-th assignment and
`offsets[e]:offsets[e+1]` are expert e's assignments. Then

    y[r] = x[rows[r]] · w[e(r)]        w: [E, in, out] (any strides, e.g. a transposed view)

(`rows=None`: x is already sorted, y[r] = x[r] · w[e(r)].)

No token is dropped and nothing is padded to a capacity: the Triton kernel walks blocks of
rows that each belong to one expert (per-block expert ids) and gathers the token rows itself.
Forward and backward (dx by the same kernel on wᵀ, then a scatter-add; dw per expert).
"""

from __future__ import annotations

import torch

from zoo.kernels.dispatch import choose, triton_module
from zoo.kernels.grouped import grouped_mm_torch


def sort_by_expert(expert_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From router choices [T, top_k]: (order, rows, offsets).

    `order` [T·top_k] sorts the flattened assignments by expert (stable), `rows = order // top_k`
    their token rows, `offsets` [E+1] the start of each expert's run (empty experts included).
    """
    flat = expert_ids.flatten()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat.device)
    offsets[1:] = torch.cumsum(counts, 0)
    return order, order // expert_ids.shape[-1], offsets


def grouped_matmul_reference(x: torch.Tensor, w: torch.Tensor, rows: torch.Tensor | None,
                             offsets: torch.Tensor) -> torch.Tensor:
    """The definition, in plain torch (differentiable): one gathered matmul per expert."""
    bounds = offsets.tolist()
    rows = torch.arange(x.shape[0], device=x.device) if rows is None else rows
    parts = [x[rows[bounds[e]:bounds[e + 1]]] @ w[e] for e in range(w.shape[0])]
    return torch.cat(parts) if parts else x.new_zeros(0, w.shape[2])


def grouped_matmul_torch(x: torch.Tensor, w: torch.Tensor, rows: torch.Tensor | None,
                         offsets: torch.Tensor) -> torch.Tensor:
    """Fastest torch path: gather the rows, then `torch._grouped_mm` where it takes the operands, else the loop.

    (On this CPU `torch._grouped_mm` ran twice as fast as the per-expert loop at OLMoE shapes.)
    """
    xs = x if rows is None else x[rows]
    return grouped_mm_torch(xs, w.transpose(1, 2), offsets[1:].to(torch.int32))


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, rows: torch.Tensor | None, offsets: torch.Tensor,
                   impl: str = "auto") -> torch.Tensor:
    """y [R, out] for sorted assignments (see the module doc); differentiable in x and w.

    `impl`: 'auto' (Triton on CUDA, else torch), 'reference', 'torch', 'triton'.
    """
    impl = choose(impl, x.device)
    if impl == "triton":
        return triton_module("triton_moe", x.device).GroupedMatmul.apply(x, w, rows, offsets)
    return (grouped_matmul_reference if impl == "reference" else grouped_matmul_torch)(x, w, rows, offsets)
