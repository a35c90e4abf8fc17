"""Norms: RMSNorm (LLaMA), LayerNorm, and `none` (for blocks that normalise inside)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from zoo.schema import param


@dataclass(frozen=True)
class RMSNormConfig:
    """x / rms(x) * g"""

    eps: float = param(1e-6, "added to the mean square", ge=1e-12, le=1)


_NATIVE = (torch.float32, torch.float64)  # where F.rms_norm gives the same values (bf16 would round once less)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) · weight, statistics in fp32 at least; `weight` is [D] or one gain row per row of x."""
    grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if not grad and x.dtype in _NATIVE and weight.dtype == x.dtype and weight.dim() == 1:
        return F.rms_norm(x, weight.shape, weight, eps)  # inference: one fused call (a decode step makes ~50)
    return _RMSNorm.apply(x, weight, eps)


class _RMSNorm(torch.autograd.Function):
    """y = n(x)·w, n(x) = x·r, r = 1/sqrt(mean(x²) + eps), with the backward written out:

    dw = Σ g·n,  dx = r·(g·w − n·mean(g·w·n)).

    The same values as autograd through the plain expression, in about half the passes over x
    (autograd keeps x², its mean's expansion and two products as separate full-size steps).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xc = x.to(torch.promote_types(x.dtype, torch.float32))
        r = torch.rsqrt(xc.square().mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, r)
        return (xc * r).to(x.dtype) * weight

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, weight, r = ctx.saved_tensors
        n = x.to(r.dtype) * r
        dw = (g * n.to(x.dtype)).sum_to_size(weight.shape).to(weight.dtype) if ctx.needs_input_grad[1] else None
        gw = (g * weight).to(r.dtype)
        dot = torch.linalg.vecdot(gw, n).unsqueeze(-1).div_(x.shape[-1])
        dx = torch.addcmul(gw, n, dot, value=-1).mul_(r).to(x.dtype)
        return dx, dw, None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


@dataclass(frozen=True)
class LayerNormConfig:
    """(x - mean) / std * g + b"""

    eps: float = param(1e-5, "added to the variance", ge=1e-12, le=1)
    bias: bool = param(True, "learn an additive bias")


@dataclass(frozen=True)
class NoNormConfig:
    """identity: no separate norm (e.g. BitNet projections normalise their own input)"""


def register(registry) -> None:
    registry.register("norm", "rmsnorm", RMSNormConfig, lambda cfg, ctx, dim: RMSNorm(dim, cfg.eps))
    registry.register("norm", "layernorm", LayerNormConfig,
                      lambda cfg, ctx, dim: nn.LayerNorm(dim, eps=cfg.eps, bias=cfg.bias))
    registry.register("norm", "none", NoNormConfig, lambda cfg, ctx, dim: nn.Identity())


