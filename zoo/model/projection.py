"""A projection: y = W·sparsify(x). Weights and input sparsity are chosen per role by the recipe."""

from __future__ import annotations

import torch
from torch import nn


class Projection(nn.Module):
    """`sparsify` (a sparsity block) then `linear` (a weights block), for one role.

    `keep` is the expected fraction of input entries that reach the matmul, so the
    projection reads that fraction of its weight columns per token (activated parameters):
    the sparsity block's `keep_fraction`, capped by `upstream_keep` (set by a block whose own
    output is sparse by construction, e.g. a GLU with `act_sparsity`).

    A weights block that must transform its input before the point where the mask belongs
    (BitNet's RMSNorm before activation quantization) sets `sparsify_inside = True` and is
    called as `linear(x, sparsify)`; it applies `sparsify` to the real-valued input it quantizes.
    """

    def __init__(self, role: str, sparsify: nn.Module, linear: nn.Module, in_features: int, out_features: int):
        super().__init__()
        self.role, self.in_features, self.out_features = role, in_features, out_features
        self.sparsify, self.linear = sparsify, linear
        self.upstream_keep = 1.0

    @property
    def keep(self) -> float:
        return min(float(getattr(self.sparsify, "keep_fraction", 1.0)), self.upstream_keep)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if getattr(self.linear, "sparsify_inside", False):
            return self.linear(x, self.sparsify)
        return self.linear(self.sparsify(x))

    def extra_repr(self) -> str:
        return f"role={self.role}, {self.in_features}->{self.out_features}"
