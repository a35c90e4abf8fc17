"""`zoo.build(recipe)`: the recipe's blocks, asked of the registry, assembled into a module."""

from __future__ import annotations

import torch

from zoo.model.config import DTYPES
from zoo.model.memory import allocator_failure, check_weights_fit
from zoo.model.transformer import Transformer
from zoo.registry import get_registry
from zoo.schema import errors_located


def build(recipe, device: str | torch.device | None = None, registry=None) -> Transformer:
    """Build the model of `recipe` (a `zoo.Recipe`). `device="meta"` allocates nothing (for accounting of big shapes).

    Elsewhere the weights are first sized on the meta device: a model that cannot fit is refused
    (`OutOfMemory`, one line) before anything is allocated, and so is a failure of the allocator."""
    registry = registry or get_registry()
    device = torch.device(device or "cpu")
    if device.type != "meta":
        check_weights_fit(_assemble(recipe, "meta", registry), device, recipe.source or "recipe")
    try:
        return _assemble(recipe, device, registry)
    except (RuntimeError, MemoryError) as err:
        oom = allocator_failure(err, f"{recipe.source or 'recipe'}: building the model")
        if oom is None:
            raise
        raise oom from None


def _assemble(recipe, device: str | torch.device, registry) -> Transformer:
    with torch.device(device), errors_located(recipe.source, recipe.origins):
        model = Transformer(recipe.model, registry, source=recipe.source)
    model.recipe = recipe
    return model.to(DTYPES[recipe.model.dtype])
