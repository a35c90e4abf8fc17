"""Projection-input sparsity: `none` (dense input)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class NoSparsityConfig:
    """the projection sees its whole input"""


def register(registry) -> None:
    registry.register("sparsity", "none", NoSparsityConfig, lambda cfg, ctx, width: nn.Identity())
