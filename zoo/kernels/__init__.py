"""Kernels for the hot operations, each a plain-torch reference, a fast torch path and a Triton kernel.

- `topk_matmul`: sparse-input matmul for top-K rows (Q-Sparse decode), weight in [in, out] layout;
- `grouped_mm`: dropless MoE grouped matmul, forward and backward, tokens sorted by expert (the
  kernel-backend contract of docs/moe.md);
- `ternary_matmul`: int8 activations × 2-bit packed ternary weights, optionally fused with the top-K gather;
- `prepare_inference(model)`: switch every block to its inference form (declared by the block, zoo/contracts.py).

Triton is imported only when a Triton kernel runs (CUDA, or TRITON_INTERPRET=1). See docs/kernels.md.
"""

from zoo.kernels.dispatch import KernelUnavailable, triton_available
from zoo.kernels.grouped import grouped_mm, grouped_mm_reference, sort_by_expert
from zoo.kernels.prepare import prepare_inference
from zoo.kernels.ternary import TernaryWeight, pack_ternary, quantize_rows, ternary_matmul, unpack_ternary
from zoo.kernels.topk_matmul import topk_matmul, topk_matmul_reference

__all__ = ["KernelUnavailable", "TernaryWeight", "grouped_mm", "grouped_mm_reference", "pack_ternary",
           "prepare_inference", "quantize_rows", "sort_by_expert", "ternary_matmul", "topk_matmul",
           "topk_matmul_reference", "triton_available", "unpack_ternary"]
