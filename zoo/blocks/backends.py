"""Kernel backends for the MoE expert matmuls: `torch` (reference) and `auto` (best for the device).

A `kernel-backend` factory `factory(cfg, ctx)` returns an object with
`grouped_mm(x, w, offsets)` (the interface in zoo/kernels/grouped.py) and optionally
`check(ctx, moe)`, called when a MoE layer is built, which raises `ctx.error(...)` for a
recipe the backend cannot run. Other backends (`triton`, the `megablocks` plugin) register the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from zoo.kernels.grouped import (
    grouped_mm_loop,
    grouped_mm_padded,
    grouped_mm_torch,
    padded_layout,
    padding_factor,
)
from zoo.recipe.schema import Validator, param

# What `auto` prefers on a CUDA device when a plugin or module registered it.
FAST_CUDA_BACKEND = "triton"


@dataclass(frozen=True)
class TorchBackendConfig:
    """plain torch: a padded batched matmul when routing is balanced enough, else torch._grouped_mm
    where the dtype and alignment allow, else one matmul per expert"""

    method: Literal["auto", "padded_bmm", "grouped_mm", "loop"] = param(
        "auto", "how experts are multiplied ('auto': padded_bmm within pad_limit, else grouped_mm, else loop)")
    pad_limit: float = param(1.25, "auto uses padded_bmm while E · largest group ≤ pad_limit · rows", ge=1)


class TorchBackend:
    name = "torch"

    def __init__(self, cfg: TorchBackendConfig):
        self.method, self.pad_limit = cfg.method, cfg.pad_limit
        self._layout: tuple[torch.Tensor, Any] | None = None  # (offsets, padded layout) of the last call

    def grouped_mm(self, x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        method = self.method
        if method == "auto":
            method = "padded_bmm" if padding_factor(offsets, w.shape[0]) <= self.pad_limit else "grouped_mm"
        if method == "padded_bmm":
            if self._layout is None or self._layout[0] is not offsets:  # the projections of one forward share it
                self._layout = (offsets, padded_layout(offsets))
            return grouped_mm_padded(x, w, offsets, self._layout[1])
        if method == "grouped_mm":
            return grouped_mm_torch(x, w, offsets)
        return grouped_mm_loop(x, w, offsets)


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
