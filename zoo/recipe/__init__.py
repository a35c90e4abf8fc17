"""TOML recipes: reading, inheritance, overrides, validation against registered schemas."""

from zoo.recipe.schema import BlockSpec, Invalid, add_role, param, slot_field

_LAZY = ("Recipe", "load_recipe", "loads_recipe", "recipe_from_dict")


def __getattr__(name: str):
    # recipe.py imports the section configs, which import schema: import it lazily.
    if name in _LAZY:
        from zoo.recipe import recipe

        return getattr(recipe, name)
    raise AttributeError(name)


__all__ = ["BlockSpec", "Invalid", "add_role", "param", "slot_field", *_LAZY]
