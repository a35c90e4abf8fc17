"""Full-precision projection weights."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from zoo.model.config import DTYPES
from zoo.schema import param


@dataclass(frozen=True)
class FullPrecisionConfig:
    """a dense floating-point weight matrix: y = x·Wᵀ (+ b)"""

    dtype: Literal["model", "float32", "bfloat16", "float16"] = param(
        "model", "storage and compute dtype of this projection ('model' = model.dtype)")


class Linear(nn.Linear):
    """nn.Linear that computes in its own dtype when it differs from the input's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype:
            return F.linear(x, self.weight, self.bias)
        b = None if self.bias is None else self.bias.to(self.weight.dtype)
        return F.linear(x.to(self.weight.dtype), self.weight, b).to(x.dtype)

    def operands(self, x: torch.Tensor, expert: torch.Tensor | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(x', W, b) with y = x'·Wᵀ + b: lets MoE experts with stacked [E, out, in] weights run grouped.
        x' depends on the token only, so `expert` (each row's expert) is not needed."""
        return x.to(self.weight.dtype), self.weight, self.bias


class PinnedDtypeLinear(Linear):
    """A Linear whose dtype is pinned by the recipe: `model.to(dtype)` leaves it alone."""

    def _apply(self, fn, recurse=True):
        dtype = self.weight.dtype
        out = super()._apply(fn, recurse)
        for p in self.parameters(recurse=False):
            p.data = p.data.to(dtype)
        return out


def build_linear(cfg: FullPrecisionConfig, ctx, in_features: int, out_features: int, bias: bool) -> nn.Module:
    if cfg.dtype == "model":
        return Linear(in_features, out_features, bias=bias)
    return PinnedDtypeLinear(in_features, out_features, bias=bias, dtype=DTYPES[cfg.dtype])


def register(registry) -> None:
    registry.register("weights", "fp", FullPrecisionConfig, build_linear)
