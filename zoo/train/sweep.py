"""`zoo sweep`: a recipe trained at every point of a grid of overrides (and seeds), one run folder each.

Sequential and resumable: a finished run (summary.json) is skipped, an interrupted one is resumed
from its newest checkpoint, so re-running the same command picks up where it stopped.
"""

from __future__ import annotations

import itertools
import json
import re
import sys
from pathlib import Path
from typing import Any

from zoo.errors import ZooError
from zoo.files import write_atomic
from zoo.recipe.loader import parse_override
from zoo.recipe.recipe import Recipe
from zoo.runs import SUMMARY, prepare_out, step_dirs
from zoo.train.loop import train


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    """['a.b=1,2', 'c=x,y'] -> {'a.b': [1, 2], 'c': ['x', 'y']} (each value parsed as TOML)."""
    grid = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip() or not raw.strip():
            raise ZooError(f"--grid {item!r}: expected key.path=v1,v2,...")
        grid[key.strip()] = [parse_override(f"{key.strip()}={v}")[1] for v in raw.split(",")]
    return grid


def points(grid: dict[str, list[Any]], seeds: list[int] | None) -> list[dict[str, Any]]:
    """Every combination of the grid's values (seeds last, so a run's seeds sit together)."""
    if seeds:
        grid = {**grid, "train.seed": list(seeds)}
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def run_name(point: dict[str, Any]) -> str:
    """Folder name of a grid point: {'model.ffn.activation': 'relu2', 'train.seed': 1} -> 'activation-relu2_seed-1'."""
    parts = [f"{k.split('.')[-1]}-{v}" for k, v in point.items()]
    return re.sub(r"[^A-Za-z0-9_.=+-]", "_", "_".join(parts)) or "base"


def run_all(runs: list[tuple[str, Recipe]], out: str | Path, *, progress: bool = True) -> list[Path]:
    """Train each (name, recipe) into out/name in turn: finished ones skipped, interrupted ones resumed."""
    out = prepare_out(out)
    done = []
    for i, (name, recipe) in enumerate(runs, 1):
        folder = out / name
        status = "done" if (folder / SUMMARY).is_file() else "resume" if step_dirs(folder) else "new"
        print(f"[{i}/{len(runs)}] {name}: " + {"done": "finished before, skipped", "resume": "resuming",
                                                "new": "training"}[status], file=sys.stderr)
        if status != "done":
            train(recipe, folder, resume=status == "resume", progress=progress)
        done.append(folder)
        write_atomic(out / "sweep.json", json.dumps({"runs": [str(p.name) for p in done],
                                                     "planned": [n for n, _ in runs]}, indent=2) + "\n")
    return done


def sweep(recipe: Recipe, grid: dict[str, list[Any]], seeds: list[int] | None, out: str | Path, *,
          progress: bool = True) -> list[Path]:
    """Train `recipe` at every grid point (validated before the first run starts)."""
    runs = [(run_name(p), recipe.replace(**p)) for p in points(grid, seeds)]
    if len({n for n, _ in runs}) != len(runs):
        raise ZooError("two grid points give the same run name; use distinct values")
    return run_all(runs, out, progress=progress)
