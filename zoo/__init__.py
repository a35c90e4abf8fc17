"""zoo: language models declared in TOML from registered blocks (dense / MoE, BitNet, Q-Sparse)."""

__version__ = "0.1.0"

from zoo import contracts  # noqa: E402  (what a plugin's blocks implement: zoo/contracts.py)
from zoo.errors import CheckpointError, PluginError, RecipeError, ZooError  # noqa: E402
from zoo.io.checkpoint import load, save  # noqa: E402
from zoo.io.gguf import from_gguf  # noqa: E402
from zoo.io.hf import from_hf  # noqa: E402
from zoo.model.accounting import account  # noqa: E402
from zoo.model.build import build  # noqa: E402
from zoo.recipe.recipe import Recipe, load_recipe, loads_recipe  # noqa: E402
from zoo.registry import get_registry, hookimpl  # noqa: E402

__all__ = ["CheckpointError", "PluginError", "Recipe", "RecipeError", "ZooError", "__version__",
           "account", "build", "contracts", "from_gguf", "from_hf", "get_registry", "hookimpl", "load", "load_recipe",
           "loads_recipe", "save"]
