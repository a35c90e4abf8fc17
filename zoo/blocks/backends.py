"""Kernel backends for the MoE expert matmuls: `torch` (reference) and `auto` (best for the device).

A `kernel-backend` factory `factory(cfg, ctx)` returns an object with
`grouped_mm(x, w, offsets, rows=None)` (the interface in zoo/kernels/grouped.py) and optionally
`check(ctx, moe)`, called when a MoE layer is built, which raises `ctx.error(...)` for a
recipe the backend cannot run. Other backends (`triton`, the `megablocks` plugin) register the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from zoo.kernels.grouped import gather_rows, grouped_mm_loop, grouped_mm_split, grouped_mm_split_of, grouped_mm_torch
from zoo.recipe.schema import Validator, param

# What `auto` prefers on a CUDA device when a plugin or module registered it.
FAST_CUDA_BACKEND = "triton"


@dataclass(frozen=True)
class TorchBackendConfig:
    """plain torch: torch._grouped_mm over the packed rows where the dtype and alignment allow, else one
    matmul per expert"""

    grouped_mm: bool = param(True, "use torch._grouped_mm when it supports the operands (false: one matmul "
                                   "per expert)")


class TorchBackend:
    name = "torch"

    def __init__(self, cfg: TorchBackendConfig):
        self.use_grouped_mm = cfg.grouped_mm

    def fuses_gather(self, x: torch.Tensor) -> bool:
        """No: an MoE layer hands us its rows already gathered (its permutation gather has a gather, not an
        index_add, as backward: faster on CPU than x[rows] here). `rows` still works when given."""
        return False

    def grouped_mm(self, x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor,
                   rows: torch.Tensor | None = None) -> torch.Tensor:
        x = gather_rows(x, rows)
        return (grouped_mm_torch if self.use_grouped_mm else grouped_mm_loop)(x, w, offsets)

    def grouped_mm_split(self, x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, sizes: Sequence[int],
                         rows: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """`grouped_mm(...).split(sizes, -1)`; off CUDA as separate contiguous outputs, one matmul per expert
        and part (a GLU's gate and up: not strided, their gradients not concatenated in backward)."""
        if x.is_cuda:
            return self.grouped_mm(x, w, offsets, rows).split(sizes, -1)
        return grouped_mm_split(gather_rows(x, rows), w, offsets, sizes)


@dataclass(frozen=True)
class AutoBackendConfig:
    """the best available backend for the device of each call: `triton` on CUDA when registered, else `torch`"""


class AutoBackend:
    name = "auto"

    def __init__(self, cfg: AutoBackendConfig, ctx: Any):
        self.ctx, self.reference, self._fast = ctx, TorchBackend(TorchBackendConfig()), None

    def fast(self) -> Any:
        """The CUDA backend, built on first use (None when nothing faster than torch is registered)."""
        if self._fast is None and FAST_CUDA_BACKEND in self.ctx.registry.kinds("kernel-backend"):
            spec = Validator(self.ctx.source or None, self.ctx.registry).block(
                "kernel-backend", FAST_CUDA_BACKEND, "backend")
            self._fast = self.ctx.build(spec)
        return self._fast

    def on(self, t: torch.Tensor) -> Any:
        """The backend for tensors like `t`."""
        return (self.fast() if t.is_cuda else None) or self.reference

    def fuses_gather(self, x: torch.Tensor) -> bool:
        fuses = getattr(self.on(x), "fuses_gather", None)
        return fuses is None or fuses(x)

    def grouped_mm(self, x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor,
                   rows: torch.Tensor | None = None) -> torch.Tensor:
        return self.on(x).grouped_mm(x, w, offsets, rows)

    def grouped_mm_split(self, x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, sizes: Sequence[int],
                         rows: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        return grouped_mm_split_of(self.on(x), x, w, offsets, sizes, rows)


def register(registry) -> None:
    registry.register("kernel-backend", "torch", TorchBackendConfig, lambda cfg, ctx: TorchBackend(cfg))
    registry.register("kernel-backend", "auto", AutoBackendConfig, AutoBackend)
