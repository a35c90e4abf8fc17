"""zoo plugin: the `megablocks` kernel backend (MegaBlocks' grouped GEMM for MoE expert matmuls).

megablocks is imported lazily, when a MoE layer with `backend = "megablocks"` is built, so
this plugin loads (and `zoo list` shows it) on machines without CUDA or without megablocks.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import torch

import zoo
from zoo.contracts import KernelBackend
from zoo.kernels.grouped import gather_rows

UNAVAILABLE = 'megablocks backend needs CUDA and the megablocks package; use backend = "auto"'
EXPERT_KINDS = ("glu", "mlp")  # expert FFNs that are plain matmuls around an activation
EXPERT_ROLES = ("expert_up_gate", "expert_down")


@dataclass(frozen=True)
class MegaBlocksConfig:
    """MegaBlocks' CUTLASS grouped GEMM on CUDA (bf16), dense full-precision expert weights only"""


def available() -> bool:
    """True when CUDA is usable and megablocks' grouped GEMM imports."""
    if not torch.cuda.is_available():
        return False
    try:
        gg = importlib.import_module("megablocks.grouped_gemm_util")
    except ImportError:
        return False
    return gg.grouped_gemm_is_available()


def refusal(ctx: Any, moe: Any) -> str | None:
    """Why this MoE layer cannot run on MegaBlocks' kernels, or None."""
    if moe.expert.kind not in EXPERT_KINDS:
        return f"its experts are ffn kind {moe.expert.kind!r}; megablocks runs {' / '.join(EXPERT_KINDS)} experts"
    for slot, plain in (("weights", "fp"), ("sparsity", "none")):
        for role in EXPERT_ROLES:
            kind = ctx.block(slot).for_role(role).kind
            if kind != plain:
                return (f"the experts' {slot} are {kind!r} (role {role}); megablocks multiplies dense "
                        f"full-precision weights with dense inputs")
    return None


class MegaBlocksBackend(KernelBackend):
    name = "megablocks"

    def __init__(self) -> None:
        self._gmm = None

    def check(self, ctx: Any, moe: Any) -> None:
        """Refuse, at build time, a recipe megablocks cannot express or a machine it cannot run on."""
        why = refusal(ctx, moe)
        if why is not None:
            raise ctx.error(moe.backend, f"megablocks backend refuses this layer: {why}; use backend = \"auto\"")
        if not available():
            raise ctx.error(moe.backend, UNAVAILABLE)

    def grouped_mm(self, x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor,
                   rows: torch.Tensor | None = None) -> torch.Tensor:
        """y[r] = x[rows[r]]·w[e(r)]ᵀ with MegaBlocks' grouped GEMM (bf16; group sizes on the host; gathered first)."""
        if self._gmm is None:
            if not available():
                raise zoo.PluginError(UNAVAILABLE)
            self._gmm = importlib.import_module("megablocks.grouped_gemm_util").ops.gmm
        x = gather_rows(x, rows)
        sizes = torch.diff(offsets.long(), prepend=offsets.new_zeros(1).long()).cpu()
        y = self._gmm(x.to(torch.bfloat16).contiguous(), w.to(torch.bfloat16).contiguous(), sizes, trans_b=True)
        return y.to(x.dtype)


@zoo.hookimpl
def zoo_register(registry) -> None:
    registry.register("kernel-backend", "megablocks", MegaBlocksConfig, lambda cfg, ctx: MegaBlocksBackend())
