"""`zoo sweep RECIPE --grid key=v1,v2 ... [--seeds 0,1,2] --out DIR`."""

from __future__ import annotations

from zoo.cli import UsageError, add_recipe_args
from zoo.recipe.recipe import load_recipe
from zoo.train.sweep import parse_grid, sweep


def add_parser(sub):
    p = sub.add_parser("sweep", help="train a recipe at every point of a grid (sequential, resumable)")
    add_recipe_args(p)
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="a recipe key and its values (repeatable; every combination is trained)")
    p.add_argument("--seeds", metavar="S1,S2", help="train every grid point with each of these train.seed values")
    p.add_argument("--out", required=True, metavar="DIR", help="folder of the runs (one sub-folder each)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def run(args) -> int:
    try:
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    except ValueError:
        raise UsageError(f"zoo sweep: --seeds {args.seeds!r}: expected integers like 0,1,2") from None
    if not args.grid and not seeds:
        raise UsageError("zoo sweep: give at least one --grid key=v1,v2 or --seeds")
    recipe = load_recipe(args.recipe, args.overrides)
    done = sweep(recipe, parse_grid(args.grid), seeds, args.out, progress=not args.quiet)
    print(f"{len(done)} run{'s' * (len(done) != 1)} in {args.out}; compare them with: zoo compare {args.out}")
    return 0
