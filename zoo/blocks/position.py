"""Rotary position embedding (RoPE) applied to queries and keys; `none` for no position signal."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from zoo.schema import param


@dataclass(frozen=True)
class RoPEConfig:
    """rotate pairs of query/key channels by position-dependent angles"""

    theta: float = param(10000.0, "base of the rotation frequencies", gt=1)


class RoPE(nn.Module):
    """Half-split layout (as LLaMA in transformers): channel i pairs with i + head_dim/2.

    rotate(x) = x·cos + roll(x, head_dim/2)·sin±, where roll swaps the halves and sin± carries the
    minus sign of the first half: the same values as x·cos + cat(-x₂, x₁)·sin, in one copy (whose
    backward is one roll back) instead of chunk, negation and concatenation.
    """

    def __init__(self, head_dim: int, max_len: int, theta: float):
        super().__init__()
        self.head_dim, self.max_len, self.theta = head_dim, max_len, theta
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)  # sin±: [-sin, sin] over the two halves
        self._cast: dict = {}  # (dtype, device) -> the tables in that compute dtype (a decode step reads one row)

    def _table(self, device) -> None:
        even = torch.arange(0, self.head_dim, 2, device=device, dtype=torch.float64)
        inv = 1.0 / self.theta ** (even / self.head_dim)
        ang = torch.outer(torch.arange(self.max_len, device=device, dtype=torch.float64), inv)
        self.cos = torch.cat([ang.cos(), ang.cos()], dim=-1)  # float64; cast once per compute dtype (_cast)
        self.sin = torch.cat([-ang.sin(), ang.sin()], dim=-1)
        self._cast = {}

    def forward(self, q: torch.Tensor, k: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """q, k: [B, heads, T, head_dim]."""
        if self.cos.numel() == 0 or self.cos.device != q.device or self.cos.dtype != torch.float64:
            self._table(q.device)
        t = q.shape[2]
        dtype = torch.promote_types(q.dtype, torch.float32)  # rotate in fp32 at least, fp64 for fp64 models
        key = (dtype, q.device)
        if key not in self._cast:
            self._cast[key] = (self.cos.to(dtype), self.sin.to(dtype))
        cos, sin = (table[start:start + t] for table in self._cast[key])
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    xc = x.to(cos.dtype)
    return (xc * cos + xc.roll(x.shape[-1] // 2, -1) * sin).to(x.dtype)


@dataclass(frozen=True)
class NoPositionConfig:
    """no positional encoding (NoPE)"""


class NoPosition(nn.Module):
    def forward(self, q, k, start):
        return q, k


def build_rope(cfg: RoPEConfig, ctx) -> RoPE:
    """RoPE over each head's channels; the head width must be even (channels rotate in pairs)."""
    if ctx.model.head_size % 2:
        raise ctx.error(ctx.block("position"), f"RoPE needs an even head width, got {ctx.model.head_size} "
                        "(change model.d_model / model.n_heads or set model.head_dim)")
    return RoPE(ctx.model.head_size, ctx.model.max_seq_len, cfg.theta)


def register(registry) -> None:
    registry.register("position", "rope", RoPEConfig, build_rope)
    registry.register("position", "none", NoPositionConfig, lambda cfg, ctx: NoPosition())
