"""Top-K sparse-input matmul: y[n] = Σ_k values[n, k] · Wt[indices[n, k]] (+ bias).

This is y = x·Wᵀ for rows of x that keep only K entries (Q-Sparse decode and small batches).
The weight is prepared once in the transposed layout `wt` [in, out], so each kept input
reads one contiguous row of `wt` and a row of x with K kept entries reads K/in of the weight.
"""

from __future__ import annotations

import functools

import torch

from zoo.kernels import cpu
from zoo.kernels.dispatch import PARALLEL_MIN_WORK, choose, triton_module


def topk_matmul_reference(values: torch.Tensor, indices: torch.Tensor, wt: torch.Tensor,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    """The definition, in plain torch: scatter the kept entries into a dense row, multiply by wt."""
    x = values.new_zeros(values.shape[0], wt.shape[0]).scatter_(1, indices.long(), values)
    y = x @ wt.to(values.dtype)
    return y if bias is None else y + bias.to(y.dtype)


@functools.lru_cache(maxsize=256)
def bag_offsets(n: int, k: int, out: int, threads: int, device: torch.device) -> torch.Tensor:
    """Start of every bag of the n·k kept entries: each row is cut into ~2 bags per thread so that
    every thread has work even at batch 1, when the work is large enough to pay for the threads.
    Cached: decode asks for the same few layouts at every step."""
    bags = max(1, min(k, -(-2 * threads // n))) if n * k * out >= PARALLEL_MIN_WORK else 1
    starts = torch.arange(0, k, -(-k // bags), device=device)
    return (torch.arange(n, device=device)[:, None] * k + starts).flatten()


def topk_matmul_torch(values: torch.Tensor, indices: torch.Tensor, wt: torch.Tensor,
                      bias: torch.Tensor | None = None) -> torch.Tensor:
    """CPU path: a fused gather-GEMV, `F.embedding_bag` with per-sample weights (no [K, out] temporary).

    The bags of a row (see `bag_offsets`) are summed after (a small [rows, bags, out] temporary).
    """
    n, k = values.shape
    # compiled: the thread count traced with, and a few traced aranges in place of the Python-side cache
    layout = bag_offsets.__wrapped__ if torch.compiler.is_compiling() else bag_offsets
    offsets = layout(n, k, wt.shape[1], cpu._threads(), values.device)
    weights = values.reshape(-1)
    weights = weights if weights.dtype == wt.dtype else weights.to(wt.dtype)
    # the op behind F.embedding_bag (mode 0 = sum), called directly: decode makes ~100 calls per token
    y = torch.embedding_bag(wt, indices.reshape(-1), offsets, False, 0, False, weights)[0]
    if offsets.numel() > n:
        y = y.view(n, offsets.numel() // n, -1).sum(1)
    if y.dtype != values.dtype:
        y = y.to(values.dtype)
    return y if bias is None else y + bias.to(y.dtype)


def topk_matmul_cpu(values: torch.Tensor, indices: torch.Tensor, wt: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """CPU path: zoo's compiled gather-GEMV (zoo/kernels/csrc): each thread streams the kept rows of wt
    across its own range of output columns, accumulating in fp32 (fp32 or bf16 weights)."""
    y = cpu.gather_gemv(values, indices, wt, bias)
    return y if y.dtype == values.dtype else y.to(values.dtype)


def topk_matmul(values: torch.Tensor, indices: torch.Tensor, wt: torch.Tensor,
                bias: torch.Tensor | None = None, impl: str = "auto") -> torch.Tensor:
    """y [N, out] from the kept `values` [N, K] at `indices` [N, K] of rows of x, and wt [in, out].

    `impl`: 'auto' (Triton on CUDA; on CPU the compiled kernel when it is built and wt is fp32/bf16,
    else the torch path), 'reference', 'torch', 'cpu', 'triton'.
    """
    impl = choose(impl, values.device, cpu_kernel=impl == "auto" and cpu.usable(wt))
    if impl == "triton":
        return triton_module("triton_topk", values.device).topk_matmul(values, indices, wt, bias)
    if impl == "cpu":
        return topk_matmul_cpu(values, indices, wt, bias)
    return (topk_matmul_reference if impl == "reference" else topk_matmul_torch)(values, indices, wt, bias)


def top_entries(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) [N, k]: the k largest |x| of each row of x [N, width], in no particular order."""
    idx = x.abs().topk(k, dim=-1, sorted=False).indices
    return x.gather(-1, idx), idx


def gather_pays(rows: int, keep: float) -> bool:
    """Whether reading K weight rows per input row beats one dense read: rows · keep < 1."""
    return rows * keep < 1.0
