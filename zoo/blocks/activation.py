"""Elementwise activations for FFNs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from zoo.schema import param


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


@dataclass(frozen=True)
class ReLU2Config:
    """ReLU(x)² (ReLU²GLU in a GLU: up ⊙ ReLU(gate)², Q-Sparse / BitNet): exact zeros for x <= 0"""


class ReLU2(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x).square()


def register(registry) -> None:
    registry.register("activation", "silu", SiLUConfig, lambda cfg, ctx: nn.SiLU())
    registry.register("activation", "gelu", GELUConfig,
                      lambda cfg, ctx: nn.GELU(approximate="tanh" if cfg.approximate else "none"))
    registry.register("activation", "relu", ReLUConfig, lambda cfg, ctx: nn.ReLU())
    registry.register("activation", "relu2", ReLU2Config, lambda cfg, ctx: ReLU2())
