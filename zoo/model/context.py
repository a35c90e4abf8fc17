"""What a block factory receives: the model config, its layer, and the projection factory."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from torch import nn

from zoo.errors import RecipeError
from zoo.model.config import ModelConfig
from zoo.model.projection import ExpertProjection, Projection
from zoo.schema import BlockSpec


@dataclass(frozen=True)
class BuildContext:
    """Passed to every factory as `ctx`. `blocks` are this layer's blocks by slot."""

    model: ModelConfig
    registry: Any
    layer: int | None = None
    blocks: dict[str, BlockSpec] = dataclasses.field(default_factory=dict)
    role_prefix: str = ""
    source: str = ""
    experts: Any = None  # zoo.blocks.moe.ExpertGroups while building a MoE layer's experts: projections come stacked

    def block(self, slot: str) -> BlockSpec:
        return self.blocks.get(slot) or getattr(self.model, slot)

    def with_roles(self, prefix: str) -> BuildContext:
        """A context whose projections take roles `prefix + role` (e.g. experts: 'expert_')."""
        return dataclasses.replace(self, role_prefix=prefix)

    def with_experts(self, groups: Any) -> BuildContext:
        """A context whose projections are `ExpertProjection`s: one stacked weight per expert of `groups`."""
        return dataclasses.replace(self, experts=groups)

    def error(self, spec: BlockSpec | None, message: str, key: str = "") -> RecipeError:
        """A recipe error at `spec`'s key path (for checks that need build-time shapes)."""
        path = ".".join(p for p in ((spec.path if spec else ""), key) if p)
        return RecipeError(message, file=self.source or None, path=path or None)

    def build(self, spec: BlockSpec, *args: Any, **kwargs: Any) -> Any:
        """`registry.build(spec, ctx, *args)`: the factory of spec's slot and kind, given this context (its
        `Invalid(key, msg)` -> a RecipeError at the spec's key path), checked against the slot's contract
        (zoo/contracts.py)."""
        return self.registry.build(spec, self, *args, file=self.source or None, **kwargs)

    def build_optional(self, spec: BlockSpec | None, *args: Any) -> nn.Module:
        """The block of `spec`, or identity when the recipe left this optional block out."""
        return nn.Identity() if spec is None else self.build(spec, *args)

    def projection(self, role: str, in_features: int, out_features: int, bias: bool = False) -> nn.Module:
        """THE projection factory: every linear map of every block is made here."""
        role = self.role_prefix + role
        weights = self.block("weights").for_role(role)
        sparsity = self.block("sparsity").for_role(role)
        linear = self.build(weights, in_features, out_features, bias)
        sparsify = self.build(sparsity, in_features)
        declared = {"layer": self.layer, "base_role": self.registry.role_chain(role)[-1],
                    "residual": self.registry.writes_residual(role), "bias": bias}
        if self.experts is not None:
            return ExpertProjection(role, sparsify, linear, in_features, out_features, self.experts, **declared)
        return Projection(role, sparsify, linear, in_features, out_features, **declared)
