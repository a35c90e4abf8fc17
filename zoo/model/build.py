"""`zoo.build(recipe)`: the recipe's blocks, asked of the registry, assembled into a module."""

from __future__ import annotations

import torch

from zoo.model.transformer import Transformer
from zoo.recipe.recipe import Recipe

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build(recipe: Recipe, device: str | torch.device | None = None, registry=None) -> Transformer:
    """Build the model of `recipe`. `device="meta"` allocates nothing (for accounting of big shapes)."""
    from zoo.registry import get_registry

    with torch.device(device or "cpu"):
        model = Transformer(recipe.model, registry or get_registry(), source=recipe.source)
    model.recipe = recipe
    return model.to(DTYPES[recipe.model.dtype])
