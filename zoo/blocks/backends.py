"""Kernel backends for the MoE expert matmuls: `torch` (reference) and `auto` (best for the device).

A `kernel-backend` factory `factory(cfg, ctx)` returns an object with
`grouped_mm(x, w, offsets)` (the interface in zoo/kernels/grouped.py) and optionally
`check(ctx, moe)`, called when a MoE layer is built, which raises `ctx.error(...)` for a
recipe the backend cannot run. Other backends (`triton`, the `megablocks` plugin) register the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from zoo.kernels.grouped import grouped_mm_loop, grouped_mm_torch
from zoo.recipe.schema import Validator, param

# What `auto` prefers on a CUDA device when a plugin or module registered it.
FAST_CUDA_BACKEND = "triton"


@dataclass(frozen=True)
class TorchBackendConfig:
    """plain torch: torch._grouped_mm where the dtype and alignment allow, else one matmul per expert"""

    grouped_mm: bool = param(True, "use torch._grouped_mm when it supports the operands (false: always loop)")


class TorchBackend:
    name = "torch"

    def __init__(self, cfg: TorchBackendConfig):
        self.use_grouped_mm = cfg.grouped_mm

    def grouped_mm(self, x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return (grouped_mm_torch if self.use_grouped_mm else grouped_mm_loop)(x, w, offsets)


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

    def grouped_mm(self, x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        backend = (self.fast() if x.is_cuda else None) or self.reference
        return backend.grouped_mm(x, w, offsets)


def register(registry) -> None:
    registry.register("kernel-backend", "torch", TorchBackendConfig, lambda cfg, ctx: TorchBackend(cfg))
    registry.register("kernel-backend", "auto", AutoBackendConfig, AutoBackend)
