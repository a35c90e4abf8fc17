"""Dense FFNs: GLU (down(act(gate(x)) * up(x))) and the plain MLP (down(act(up(x))))."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from zoo import contracts
from zoo.contracts import FFN
from zoo.schema import BlockSpec, param, slot_field


def default_hidden(d_model: int, multiple_of: int = 64) -> int:
    """LLaMA's 2/3 · 4d, rounded up to a multiple of `multiple_of`."""
    h = int(8 * d_model / 3)
    return multiple_of * ((h + multiple_of - 1) // multiple_of)


@dataclass(frozen=True)
class GLUConfig:
    """gated linear unit: down(act(gate(x)) * up(x))"""

    hidden: int | None = param(None, "inner width (default 8/3·d_model rounded up to 64)", ge=1, le=1 << 20)
    activation: BlockSpec = slot_field("activation", {"kind": "silu"}, "activation of the gate")
    bias: bool = param(False, "biases on the projections")
    act_sparsity: BlockSpec | None = slot_field(
        "sparsity", None, "sparsity applied to act(gate) before ⊙ up (Q-Sparse after the SiLU, for SiLU models)")
    sub_norm: BlockSpec | None = slot_field("norm", None, "norm of the down projection's input (SubLN, BitNet)")


class GLU(FFN):
    def __init__(self, cfg: GLUConfig, ctx: contracts.BuildContext, d_model: int):
        super().__init__()
        self.hidden = cfg.hidden or default_hidden(d_model)
        self.up_gate = ctx.projection("up_gate", d_model, 2 * self.hidden, cfg.bias)
        self.act = ctx.build(cfg.activation)
        self.act_sparsity = ctx.build_optional(cfg.act_sparsity, self.hidden)
        self.sub_norm = ctx.build_optional(cfg.sub_norm, self.hidden)
        self.down = ctx.projection("down", self.hidden, d_model, cfg.bias)
        if cfg.act_sparsity is not None:  # act(gate) ⊙ up keeps at most what act_sparsity keeps
            self.down.upstream_keep = float(self.act_sparsity.keep_fraction)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.up_gate.split(x, (self.hidden, self.hidden))
        return self.down(self.sub_norm(self.act_sparsity(self.act(gate)) * up))


@dataclass(frozen=True)
class MLPConfig:
    """plain MLP: down(act(up(x)))"""

    hidden: int | None = param(None, "inner width (default 4·d_model)", ge=1, le=1 << 20)
    activation: BlockSpec = slot_field("activation", {"kind": "gelu"}, "activation")
    bias: bool = param(False, "biases on the projections")
    sub_norm: BlockSpec | None = slot_field("norm", None, "norm of the down projection's input (SubLN, BitNet)")


class MLP(FFN):
    def __init__(self, cfg: MLPConfig, ctx: contracts.BuildContext, d_model: int):
        super().__init__()
        self.hidden = cfg.hidden or 4 * d_model
        self.up = ctx.projection("up_gate", d_model, self.hidden, cfg.bias)
        self.act = ctx.build(cfg.activation)
        self.sub_norm = ctx.build_optional(cfg.sub_norm, self.hidden)
        self.down = ctx.projection("down", self.hidden, d_model, cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.sub_norm(self.act(self.up(x))))


def register(registry) -> None:
    registry.register("ffn", "glu", GLUConfig, GLU)
    registry.register("ffn", "mlp", MLPConfig, MLP)
