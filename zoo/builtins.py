"""zoo's own blocks, converters, datasets, tokenizers, optimizers, schedules and catalogue entries.

They register through the same `zoo_register` hook as any plugin: the registry loads this module by name
(`zoo.registry.plugins.CORE_MODULE`), as it loads a plugin's. It imports from every layer that registers
something, so it sits at the top of the package (docs/architecture.md); each module it lists has
`register(registry)`, and none is named anywhere else in the core.
"""

from __future__ import annotations

from zoo import data
from zoo.blocks import (
    activation,
    attention,
    backends,
    bitnet,
    ffn,
    moe,
    norm,
    position,
    router,
    sparsity,
    threshold,
    triton_backend,
    weights,
)
from zoo.io import arch, pretrained
from zoo.registry.hookspecs import hookimpl
from zoo.train import optim, schedule

MODULES = (
    norm,
    position,
    attention,
    activation,
    ffn,
    moe,
    router,
    backends,
    triton_backend,
    weights,
    sparsity,
    threshold,
    bitnet,
    data,
    optim,
    schedule,
    arch,
    pretrained,
)


@hookimpl
def zoo_register(registry) -> None:
    for module in MODULES:
        module.register(registry)
