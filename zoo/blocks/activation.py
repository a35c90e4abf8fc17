"""Elementwise activations for FFNs."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from zoo.recipe.schema import param


@dataclass(frozen=True)
class SiLUConfig:
    """x * sigmoid(x) (SwiGLU when used in a GLU)"""


@dataclass(frozen=True)
class GELUConfig:
    """Gaussian error linear unit"""

    approximate: bool = param(False, "use the tanh approximation")


@dataclass(frozen=True)
class ReLUConfig:
    """max(x, 0)"""


def register(registry) -> None:
    registry.register("activation", "silu", SiLUConfig, lambda cfg, ctx: nn.SiLU())
    registry.register("activation", "gelu", GELUConfig,
                      lambda cfg, ctx: nn.GELU(approximate="tanh" if cfg.approximate else "none"))
    registry.register("activation", "relu", ReLUConfig, lambda cfg, ctx: nn.ReLU())
