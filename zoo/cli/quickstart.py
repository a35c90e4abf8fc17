"""`zoo quickstart`: the main job. Trains tiny dense, Q-Sparse and MoE + Q-Sparse + BitNet models on the
bundled King James Bible text at equal tokens, then prints the comparison table and writes the plot."""

from __future__ import annotations

from pathlib import Path

from zoo.cli import print_table
from zoo.eval.compare import compare, load_run, plot, table
from zoo.recipe.loader import add_set_argument
from zoo.recipe.recipe import BUNDLED, load_recipe
from zoo.train.sweep import run_all

RECIPES = BUNDLED / "tiny"
DEFAULT = ("dense.toml", "qsparse.toml", "moe-bitnet-qsparse.toml")
# Equal tokens for every model, sized to finish in about ten minutes on two CPU cores.
SETTINGS = ["train.batch_size=16", "train.seq_len=128", "train.eval_every=25", "train.eval_batches=4",
            "train.log_every=10", "train.schedule.warmup_steps=15"]


def add_parser(sub):
    p = sub.add_parser("quickstart", help="train dense / Q-Sparse / MoE+Q-Sparse+BitNet tiny models and compare them")
    p.add_argument("--out", default="runs/quickstart", metavar="DIR", help="where the runs go (default: %(default)s)")
    p.add_argument("--steps", type=int, default=200, metavar="N", help="optimizer steps per model (default: 200)")
    p.add_argument("--recipes", nargs="+", metavar="TOML",
                   help=f"recipes to train instead of recipes/tiny/{{{','.join(DEFAULT)}}}")
    add_set_argument(p, "a key of every recipe")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def run(args) -> int:
    import time

    start = time.perf_counter()
    paths = [Path(p) for p in args.recipes] if args.recipes else [RECIPES / name for name in DEFAULT]
    overrides = [*SETTINGS, f"train.steps={args.steps}", *args.overrides]
    recipes = [load_recipe(p, overrides) for p in paths]  # all validated before the first one trains
    folders = run_all([(r.name or p.stem, r) for p, r in zip(paths, recipes)], args.out, progress=not args.quiet)
    runs = [load_run(f) for f in folders]
    rows = compare(runs)
    figure = plot(runs, rows, Path(args.out) / "compare.png")
    headers, cells = table(rows)
    print()
    print_table(cells, headers)
    print(f"\nplot: {figure}\nruns: {args.out} (zoo eval / zoo generate / zoo compare take these folders)")
    print(f"total time: {time.perf_counter() - start:.0f} s")
    return 0
