"""The built-in blocks. They register through the same `zoo_register` hook as any plugin."""

from __future__ import annotations

import importlib

from zoo.registry.hookspecs import hookimpl

# Each module has `register(registry)`; listed here, and nowhere else in the core.
MODULES = [
    "zoo.blocks.norm",
    "zoo.blocks.position",
    "zoo.blocks.attention",
    "zoo.blocks.activation",
    "zoo.blocks.ffn",
    "zoo.blocks.moe",
    "zoo.blocks.router",
    "zoo.blocks.backends",
    "zoo.blocks.triton_backend",
    "zoo.blocks.weights",
    "zoo.blocks.sparsity",
    "zoo.blocks.threshold",
    "zoo.blocks.bitnet",
    "zoo.data",
    "zoo.train.optim",
    "zoo.train.schedule",
    "zoo.io.arch",
    "zoo.io.pretrained",
]


@hookimpl
def zoo_register(registry) -> None:
    for name in MODULES:
        importlib.import_module(name).register(registry)
