"""Kernel backends for the MoE expert matmuls: `torch` (reference) and `auto` (best for the device).

A `kernel-backend` factory `factory(cfg, ctx)` returns a `zoo.contracts.KernelBackend`:
`grouped_mm(x, w, offsets, rows=None)` (the interface in zoo/kernels/grouped.py), and where it
needs them `grouped_mm_split`, `fuses_gather` and `check(ctx, moe)`, called when a MoE layer is
built, which raises `ctx.error(...)` for a recipe the backend cannot run. Other backends
(`triton`, the `megablocks` plugin) register the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from zoo.contracts import KernelBackend
from zoo.kernels.grouped import gather_rows, grouped_mm_split, grouped_mm_torch
from zoo.schema import param

# What `auto` prefers on a CUDA device when a plugin or module registered it.
FAST_CUDA_BACKEND = "triton"


@dataclass(frozen=True)
class TorchBackendConfig:
    """plain torch: torch._grouped_mm over the packed rows where the dtype and alignment allow, else one
    matmul per expert"""

    grouped_mm: bool = param(True, "use torch._grouped_mm when it supports the operands (false: one matmul "
                                   "per expert)")


class TorchBackend(KernelBackend):
    name = "torch"

    def __init__(self, cfg: TorchBackendConfig):
        self.use_grouped_mm = cfg.grouped_mm

    def fuses_gather(self, x: torch.Tensor) -> bool:
        """Off CUDA: the per-expert loop gathers each expert's token rows itself (see grouped_mm_split)."""
        return not x.is_cuda

    def grouped_mm(self, x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor,
                   rows: torch.Tensor | None = None) -> torch.Tensor:
        return self.grouped_mm_split(x, w, offsets, (w.shape[1],), rows)[0]

    def grouped_mm_split(self, x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, sizes: Sequence[int],
                         rows: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """`grouped_mm(...).split(sizes, -1)`. Rows already sorted, one part (or any on CUDA): torch._grouped_mm
        where it takes the operands. Else, on CPU, one matmul per expert and part (grouped_mm_split), each
        expert gathering its own token rows: the parts come out contiguous (a GLU's gate and up: not strided,
        their gradients not concatenated), no gathered copy of the input is made, forward or backward."""
        if x.is_cuda:
            x, rows = gather_rows(x, rows), None
        if rows is None and (len(sizes) == 1 or x.is_cuda) and self.use_grouped_mm:
            return grouped_mm_torch(x, w, offsets).split(sizes, -1)
        return grouped_mm_split(x, w, offsets, sizes, rows)


@dataclass(frozen=True)
class AutoBackendConfig:
    """the best available backend for the device of each call: `triton` on CUDA when registered, else `torch`"""


class AutoBackend(KernelBackend):
    name = "auto"

    def __init__(self, cfg: AutoBackendConfig, ctx: Any):
        self.ctx, self.reference, self._fast = ctx, TorchBackend(TorchBackendConfig()), None

    def fast(self) -> KernelBackend | None:
        """The CUDA backend, built on first use (None when nothing faster than torch is registered)."""
        if self._fast is None and FAST_CUDA_BACKEND in self.ctx.registry.kinds("kernel-backend"):
            spec = self.ctx.registry.spec("kernel-backend", FAST_CUDA_BACKEND, "backend", self.ctx.source or None)
            self._fast = self.ctx.build(spec)
        return self._fast

    def on(self, t: torch.Tensor) -> KernelBackend:
        """The backend for tensors like `t`."""
        return (self.fast() if t.is_cuda else None) or self.reference

    def fuses_gather(self, x: torch.Tensor) -> bool:
        return self.on(x).fuses_gather(x)

    def grouped_mm(self, x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor,
                   rows: torch.Tensor | None = None) -> torch.Tensor:
        return self.on(x).grouped_mm(x, w, offsets, rows)

    def grouped_mm_split(self, x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, sizes: Sequence[int],
                         rows: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        return self.on(x).grouped_mm_split(x, w, offsets, sizes, rows)


def register(registry) -> None:
    registry.register("kernel-backend", "torch", TorchBackendConfig, lambda cfg, ctx: TorchBackend(cfg))
    registry.register("kernel-backend", "auto", AutoBackendConfig, AutoBackend)
