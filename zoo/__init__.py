"""zoo: language models declared in TOML from registered blocks (dense / MoE, BitNet, Q-Sparse)."""

from zoo import contracts  # what a plugin's blocks implement (zoo/contracts.py)
from zoo._version import __version__
from zoo.errors import CheckpointError, PluginError, RecipeError, ZooError
from zoo.io.checkpoint import load, save
from zoo.io.gguf import from_gguf
from zoo.io.hf import from_hf
from zoo.model.accounting import account
from zoo.model.build import build
from zoo.recipe.recipe import Recipe, load_recipe, loads_recipe
from zoo.registry import get_registry, hookimpl

__all__ = ["CheckpointError", "PluginError", "Recipe", "RecipeError", "ZooError", "__version__",
           "account", "build", "contracts", "from_gguf", "from_hf", "get_registry", "hookimpl", "load", "load_recipe",
           "loads_recipe", "save"]
