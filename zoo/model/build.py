"""`zoo.build(recipe)`: the recipe's blocks, asked of the registry, assembled into a module."""

from __future__ import annotations

import torch

from zoo.model.config import DTYPES
from zoo.model.transformer import Transformer
from zoo.recipe.recipe import Recipe, errors_located


def build(recipe: Recipe, device: str | torch.device | None = None, registry=None) -> Transformer:
    """Build the model of `recipe`. `device="meta"` allocates nothing (for accounting of big shapes)."""
    from zoo.registry import get_registry

    with torch.device(device or "cpu"), errors_located(recipe):
        model = Transformer(recipe.model, registry or get_registry(), source=recipe.source)
    model.recipe = recipe
    return model.to(DTYPES[recipe.model.dtype])
