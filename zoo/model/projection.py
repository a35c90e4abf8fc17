"""A projection: y = W·sparsify(x). Weights and input sparsity are chosen per role by the recipe."""

from __future__ import annotations

import torch
from torch import nn


class Projection(nn.Module):
    """`sparsify` (a sparsity block) then `linear` (a weights block), for one role.

    `keep` is the expected fraction of input entries that reach the matmul, so the
    projection reads that fraction of its weight columns per token (activated parameters).
    """

    def __init__(self, role: str, sparsify: nn.Module, linear: nn.Module, in_features: int, out_features: int):
        super().__init__()
        self.role, self.in_features, self.out_features = role, in_features, out_features
        self.sparsify, self.linear = sparsify, linear

    @property
    def keep(self) -> float:
        return float(getattr(self.sparsify, "keep_fraction", 1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.sparsify(x))

    def extra_repr(self) -> str:
        return f"role={self.role}, {self.in_features}->{self.out_features}"
