"""The `triton` kernel backend of the MoE FFN: the dropless grouped matmul of zoo/kernels (forward and backward)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from zoo.contracts import KernelBackend
from zoo.kernels.dispatch import triton_available
from zoo.kernels.grouped import grouped_mm_triton


@dataclass(frozen=True)
class TritonBackendConfig:
    """Triton grouped matmul: token rows gathered in the kernel, per-block expert ids, no padding, dw per expert"""


class TritonBackend(KernelBackend):
    """`grouped_mm(x, w, offsets, rows)` of docs/moe.md on zoo.kernels.grouped_mm_triton (CUDA; CPU only when
    interpreting). With `rows` the kernel gathers the token rows itself: no expert-sorted copy of x."""

    name = "triton"

    def grouped_mm(self, x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor,
                   rows: torch.Tensor | None = None) -> torch.Tensor:
        return grouped_mm_triton(x, w, offsets, rows)

    def check(self, ctx, moe_config) -> None:
        if not triton_available():
            raise ctx.error(moe_config.backend, "the triton kernel backend needs the triton package (Linux); "
                            "use backend = \"auto\" or \"torch\"")


def register(registry) -> None:
    registry.register("kernel-backend", "triton", TritonBackendConfig, lambda cfg, ctx: TritonBackend())
