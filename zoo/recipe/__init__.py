"""TOML recipes: reading (`extends`, `--set`), the `Recipe` root and its run sections.

The schema primitives a plugin's config uses are re-exported here from zoo.schema, their home:
`zoo.recipe.param`, `slot_field`, `Invalid`, `BlockSpec`.
"""

from zoo.recipe.recipe import Recipe, load_recipe, loads_recipe, recipe_from_dict
from zoo.schema import BlockSpec, Invalid, param, slot_field

__all__ = ["BlockSpec", "Invalid", "Recipe", "load_recipe", "loads_recipe", "param", "recipe_from_dict", "slot_field"]
