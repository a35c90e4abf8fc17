"""`load_recipe`: TOML file(s) + overrides -> a frozen, validated `Recipe` that round-trips."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from zoo.errors import RecipeError
from zoo.model.config import LAYER_SLOTS, ModelConfig
from zoo.recipe.loader import OVERRIDES, apply_overrides, parse_toml, read_with_extends
from zoo.recipe.sections import DataConfig, ParallelConfig, TrainConfig
from zoo.registry import get_registry
from zoo.schema import BlockSpec, Validator, deep_merge, located, param, slot_field, to_plain

BUNDLED = Path(__file__).resolve().parents[2] / "recipes"  # the recipes of a source checkout (recipes/)


@dataclass(frozen=True)
class Recipe:
    """A whole recipe: the model, how to train it, and on what data.

    `source` (not part of equality) names the file for error messages; `origins` ({key path: file},
    not part of equality) the file that set each key, so that an error found later (building, training)
    names the file, `extends` base or `<overrides>` that set the key it is about.
    """

    name: str = param("", "a short name for tables and plots")
    model: ModelConfig = param(None, "the architecture")
    train: TrainConfig = param(None, "the training run")
    optim: BlockSpec = slot_field("optimizer", {"kind": "adamw"}, "the optimizer and its settings")
    data: DataConfig = param(None, "training and validation data")
    parallel: ParallelConfig = param(None, "data parallelism when launched on several processes")
    source: str = dataclasses.field(default="", compare=False, metadata={"internal": True})
    origins: dict = dataclasses.field(default_factory=dict, compare=False, repr=False, metadata={"internal": True})

    def to_dict(self) -> dict:
        return to_plain(self)

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())

    def replace(self, **overrides: Any) -> Recipe:
        """A new recipe with dotted-key overrides applied (validated again)."""
        origins = dict(self.origins)
        return recipe_from_dict(apply_overrides(self.to_dict(), overrides, origins=origins),
                                source=self.source or OVERRIDES, origins=origins)


def _as_table(block: Any) -> Any:
    return {"kind": block} if isinstance(block, str) else block


def _merge_layer_patterns(data: dict) -> dict:
    """A layer pattern's block table is merged over the model-wide one when it keeps its kind.

    `[[model.layers]] ffn = { hidden = 1024 }` changes one field of the model-wide FFN for those
    layers; naming another kind (`ffn = { kind = "mlp" }`) starts from that kind's defaults.
    """
    model = data.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("layers"), list):
        return data
    defaults = {f.name: f.default.data for f in dataclasses.fields(ModelConfig) if hasattr(f.default, "data")}
    patterns = []
    for pattern in model["layers"]:
        if isinstance(pattern, dict):
            pattern = dict(pattern)
            for slot in LAYER_SLOTS:
                over, base = _as_table(pattern.get(slot)), _as_table(model.get(slot))
                if not isinstance(over, dict):
                    continue
                if isinstance(base, dict) and "kind" not in base and slot in defaults:
                    base = deep_merge(defaults[slot], base)
                elif base is None:
                    base = defaults.get(slot)
                if isinstance(base, dict) and over.get("kind", base.get("kind")) == base.get("kind"):
                    pattern[slot] = deep_merge(base, over)
        patterns.append(pattern)
    return {**data, "model": {**model, "layers": patterns}}


def recipe_from_dict(data: dict, source: str = "<dict>", registry: Any = None,
                     origins: dict[str, str] | None = None) -> Recipe:
    """Validate plain data (as read from TOML) into a Recipe.

    `origins` ({key path: file}, from `read_with_extends`) makes an error name the file that set the key.
    """
    validator = Validator(source, registry or get_registry(), origins)
    try:
        recipe = validator.dataclass(Recipe, _merge_layer_patterns(data), "")
    except RecipeError as err:
        raise located(err, source, origins or {}) from None
    return dataclasses.replace(recipe, source=source, origins=dict(origins or {}))


def read_recipe_data(path: str | Path, overrides: list[str] | dict[str, Any] | None = None,
                     origins: dict[str, str] | None = None) -> dict:
    """A recipe file as plain data: `extends` resolved and overrides applied, not yet validated."""
    return apply_overrides(read_with_extends(path, origins=origins), overrides, origins=origins)


def load_recipe(path: str | Path, overrides: list[str] | dict[str, Any] | None = None) -> Recipe:
    """Read a recipe file, resolve `extends`, apply `a.b.c=value` overrides, validate."""
    origins: dict[str, str] = {}
    data = read_recipe_data(path, overrides, origins)
    return recipe_from_dict(data, source=str(path), origins=origins)


def loads_recipe(text: str, source: str = "<string>") -> Recipe:
    """Validate a recipe given as TOML text (no `extends`)."""
    data = parse_toml(text, source)
    if "extends" in data:
        raise RecipeError("extends needs a file on disk; use load_recipe", file=source, path="extends")
    return recipe_from_dict(data, source=source)
