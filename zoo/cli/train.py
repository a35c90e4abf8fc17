"""`zoo train RECIPE --out DIR [--set k=v ...] [--steps N] [--resume]`."""

from __future__ import annotations

from zoo.cli import add_recipe_args
from zoo.recipe.recipe import load_recipe
from zoo.train.loop import train


def add_parser(sub):
    p = sub.add_parser("train", help="train a recipe into a run folder (metrics, checkpoints, summary)")
    add_recipe_args(p)
    p.add_argument("--out", required=True, metavar="DIR", help="run folder (created; must be new unless --resume)")
    p.add_argument("--steps", type=int, metavar="N", help="shorthand for --set train.steps=N")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in DIR")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def run(args) -> int:
    import json
    import os

    overrides = list(args.overrides) + ([f"train.steps={args.steps}"] if args.steps is not None else [])
    recipe = load_recipe(args.recipe, overrides)
    summary = train(recipe, args.out, resume=args.resume, progress=not args.quiet)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one line from rank 0
        print(json.dumps({k: summary[k] for k in ("steps", "tokens", "train_loss", "val_loss", "val_ppl")}))
    return 0
