"""Measured activation sparsity: the fraction of exact zeros at each projection's matmul input.

Forward hooks on every projection's sparsity block (its output is what the matmul reads,
before any activation quantization) count zeros per layer and role — top-K zeros and the
natural zeros of ReLU² alike. `measure_sparsity(model, batches)` returns a `SparsityTable`;
`table.paper()` gives the breakdown of the Q-Sparse paper's Table 2 (QKV/Out/Up/Gate/Down and
overall, the overall weighted by each projection's parameters, i.e. 1 - activated / total).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from zoo.model.projection import Projection

# The paper's columns; a fused up_gate projection feeds both Up and Gate from one input.
PAPER_COLUMNS = {"QKV": ("qkv",), "Out": ("o",), "Up": ("up_gate",), "Gate": ("up_gate",), "Down": ("down",)}


@dataclass
class Site:
    """Zero counts at one projection input."""

    layer: int | None
    role: str
    base_role: str
    params: int
    zeros: int = 0
    total: int = 0

    @property
    def sparsity(self) -> float:
        return self.zeros / self.total if self.total else 0.0


@dataclass
class SparsityTable:
    """Measured sparsity per (layer, role); `by_role`, `overall` and `paper()` summarise it."""

    sites: dict[str, Site] = field(default_factory=dict)

    def rows(self) -> list[dict]:
        """One row per projection: module name, layer, role, measured sparsity, elements seen."""
        return [{"name": n, "layer": s.layer, "role": s.role, "sparsity": s.sparsity, "elements": s.total}
                for n, s in self.sites.items()]

    def by_role(self, base: bool = True) -> dict[str, float]:
        """Sparsity per role over all layers; `base` folds each role into the root it falls back to
        (expert_/shared_ roles into qkv/o/up_gate/down)."""
        zeros: dict[str, int] = {}
        total: dict[str, int] = {}
        for s in self.sites.values():
            role = s.base_role if base else s.role
            zeros[role] = zeros.get(role, 0) + s.zeros
            total[role] = total.get(role, 0) + s.total
        return {r: zeros[r] / total[r] for r in sorted(total) if total[r]}

    def by_layer(self) -> dict[int | None, dict[str, float]]:
        """Sparsity per layer and role ({layer: {role: sparsity}}); layer None: projections outside blocks."""
        zeros: dict[tuple, int] = {}
        total: dict[tuple, int] = {}
        for s in self.sites.values():
            zeros[s.layer, s.role] = zeros.get((s.layer, s.role), 0) + s.zeros
            total[s.layer, s.role] = total.get((s.layer, s.role), 0) + s.total
        out: dict[int | None, dict[str, float]] = {}
        for (layer, role), n in total.items():
            if n:
                out.setdefault(layer, {})[role] = zeros[layer, role] / n
        return out

    def overall(self) -> float:
        """Parameter-weighted sparsity: the fraction of projection weights not read per token."""
        seen = [s for s in self.sites.values() if s.total]
        weight = sum(s.params for s in seen)
        return sum(s.params * s.sparsity for s in seen) / weight if weight else 0.0

    def paper(self) -> dict[str, float]:
        """The Q-Sparse paper's Table 2 columns (QKV, Out, Up, Gate, Down, Overall), as fractions."""
        roles = self.by_role()
        out = {col: roles[r[0]] for col, r in PAPER_COLUMNS.items() if r[0] in roles}
        out["Overall"] = self.overall()
        return out


@torch.no_grad()
def measure_sparsity(model: nn.Module, batches: Iterable[torch.Tensor]) -> SparsityTable:
    """Run `model` on each batch of token ids [B, T] and count the zeros every projection multiplies."""
    table = SparsityTable()
    handles = []

    def hook(site: Site):
        def count(module, args, output):
            site.zeros += int((output == 0).sum())
            site.total += output.numel()
        return count

    for name, module in model.named_modules():
        if isinstance(module, Projection):
            site = Site(module.layer, module.role, module.base_role, module.weight_count)
            table.sites[name] = site
            handles.append(module.sparsify.register_forward_hook(hook(site)))
    was_training = model.training
    model.eval()
    try:
        for idx in batches:
            model(idx.to(next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return table
