"""An example zoo plugin with two blocks:

- ScaleNorm (Nguyen & Salazar, 2019): y = g · x / ‖x‖ with one learned scalar g, the norm kind 'scalenorm';
- int8 weights with an int8 decode GEMV as their inference form, the weights kind 'int8' (int8.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

import zoo
from zoo.recipe import param

from .int8 import Int8Config, build_int8


@dataclass(frozen=True)
class ScaleNormConfig:
    """g · x / ‖x‖ with a single learned scalar g (initialised to sqrt(d), so it starts as RMSNorm without gains)"""

    eps: float = param(1e-5, "lower bound on ‖x‖", gt=0, le=1)


class ScaleNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.g = nn.Parameter(torch.full((), math.sqrt(dim)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xc = x.to(torch.promote_types(x.dtype, torch.float32))
        return (xc / xc.norm(dim=-1, keepdim=True).clamp_min(self.eps)).to(x.dtype) * self.g


def build_scalenorm(cfg: ScaleNormConfig, ctx, dim: int) -> ScaleNorm:
    """The `norm` slot's factory signature: (config, build context, width)."""
    return ScaleNorm(dim, cfg.eps)


@zoo.hookimpl
def zoo_register(registry) -> None:
    registry.register("norm", "scalenorm", ScaleNormConfig, build_scalenorm)
    registry.register("weights", "int8", Int8Config, build_int8)
