"""`zoo train RECIPE --out DIR [--set k=v ...] [--steps N] [--resume] [--nproc-per-node N]`."""

from __future__ import annotations

import os
import sys

from zoo.cli import UsageError, add_recipe_args, guarded
from zoo.recipe.recipe import load_recipe
from zoo.train.launch import launch
from zoo.train.loop import check_ranks, train


def add_parser(sub):
    p = sub.add_parser("train", help="train a recipe into a run folder (metrics, checkpoints, summary)")
    add_recipe_args(p)
    p.add_argument("--out", required=True, metavar="DIR", help="run folder (created; must be new unless --resume)")
    p.add_argument("--steps", type=int, metavar="N", help="shorthand for --set train.steps=N")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in DIR")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--nproc-per-node", type=int, metavar="N",
                   help="train on N processes of this machine ([parallel] says how; like torchrun --standalone)")
    return p


def run(args) -> int:
    overrides = list(args.overrides) + ([f"train.steps={args.steps}"] if args.steps is not None else [])
    recipe = load_recipe(args.recipe, overrides)
    n = args.nproc_per_node
    if n is not None:
        if n < 1:
            raise UsageError(f"zoo train: --nproc-per-node {n}: give a number of processes >= 1")
        if "WORLD_SIZE" in os.environ:
            raise UsageError(f"zoo train: --nproc-per-node under a launcher that started {os.environ['WORLD_SIZE']} "
                             "processes already (torchrun?); use one of the two")
        if n > 1:
            check_ranks(recipe, n, args.out, args.resume)  # a mistake in the recipe costs no process start
            args.nproc_per_node = None
            return launch(n, rank_main, args)
    summary = train(recipe, args.out, resume=args.resume, progress=not args.quiet)
    if os.environ.get("RANK", "0") == "0":  # on several processes, one line from rank 0
        import json

        print(json.dumps({k: summary[k] for k in ("steps", "tokens", "train_loss", "val_loss", "val_ppl")}))
    return 0


def rank_main(args) -> None:
    """One rank of `zoo train --nproc-per-node`: its error is reported by the launcher."""
    sys.exit(guarded(lambda: run(args), launched=True))
