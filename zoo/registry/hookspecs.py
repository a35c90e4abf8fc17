"""The whole plugin surface: one hook. A plugin module defines

    @zoo.hookimpl
    def zoo_register(registry):
        registry.register("norm", "layernorm", LayerNormConfig, build_layernorm)

and names itself in the entry-point group ``zoo`` of its distribution.
"""

import pluggy

hookspec = pluggy.HookspecMarker("zoo")
hookimpl = pluggy.HookimplMarker("zoo")


@hookspec
def zoo_register(registry) -> None:
    """Register blocks by calling ``registry.register(slot, kind, config_cls, factory)``."""
