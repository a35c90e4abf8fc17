"""Top-K sparse-input matmul: y[n] = Σ_k values[n, k] · Wt[indices[n, k]] (+ bias).

This is y = x·Wᵀ for rows of x that keep only K entries (Q-Sparse decode and small batches).
The weight is prepared once in the transposed layout `wt` [in, out], so each kept input
reads one contiguous row of `wt` and a row of x with K kept entries reads K/in of the weight.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from zoo.kernels.dispatch import choose, triton_module


def topk_matmul_reference(values: torch.Tensor, indices: torch.Tensor, wt: torch.Tensor,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    """The definition, in plain torch: scatter the kept entries into a dense row, multiply by wt."""
    x = values.new_zeros(values.shape[0], wt.shape[0]).scatter_(1, indices.long(), values)
    y = x @ wt.to(values.dtype)
    return y if bias is None else y + bias.to(y.dtype)


PARALLEL_MIN_WORK = 1 << 20  # multiply-adds below which splitting a row over threads costs more than it saves


@functools.lru_cache(maxsize=256)
def bag_offsets(n: int, k: int, step: int, device: torch.device) -> torch.Tensor:
    """Start of every bag when each of n rows of k entries is cut into bags of `step` (decode reuses them)."""
    starts = torch.arange(0, k, step, device=device)
    return (torch.arange(n, device=device)[:, None] * k + starts).flatten()


def topk_matmul_torch(values: torch.Tensor, indices: torch.Tensor, wt: torch.Tensor,
                      bias: torch.Tensor | None = None) -> torch.Tensor:
    """CPU path: a fused gather-GEMV, `F.embedding_bag` with per-sample weights (no [K, out] temporary).

    Each row is split into a few bags so that every thread has work even at batch 1 (when the
    work is large enough to pay for the threads); the bags of a row are then summed (a small
    [rows, bags, out] temporary).
    """
    n, k = values.shape
    parallel = n * k * wt.shape[1] >= PARALLEL_MIN_WORK
    bags = max(1, min(k, -(-2 * torch.get_num_threads() // n))) if parallel else 1
    offsets = bag_offsets(n, k, -(-k // bags), values.device)
    y = F.embedding_bag(indices.reshape(-1), wt, offsets, mode="sum",
                        per_sample_weights=values.reshape(-1).to(wt.dtype))
    per_row = offsets.numel() // n
    y = y.view(n, per_row, -1).sum(1) if per_row > 1 else y
    y = y.to(values.dtype)
    return y if bias is None else y + bias.to(y.dtype)


def topk_matmul(values: torch.Tensor, indices: torch.Tensor, wt: torch.Tensor,
                bias: torch.Tensor | None = None, impl: str = "auto") -> torch.Tensor:
    """y [N, out] from the kept `values` [N, K] at `indices` [N, K] of rows of x, and wt [in, out].

    `impl`: 'auto' (Triton on CUDA, else the torch path), 'reference', 'torch', 'triton'.
    """
    impl = choose(impl, values.device)
    if impl == "triton":
        return triton_module("triton_topk", values.device).topk_matmul(values, indices, wt, bias)
    return (topk_matmul_reference if impl == "reference" else topk_matmul_torch)(values, indices, wt, bias)


def gather_pays(rows: int, keep: float) -> bool:
    """Whether reading K weight rows per input row beats one dense read: rows · keep < 1."""
    return rows * keep < 1.0
