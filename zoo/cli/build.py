"""`zoo build RECIPE`: build the model on the meta device and print its parameter and FLOP accounting."""

from __future__ import annotations

import argparse

from zoo.cli import UsageError, add_recipe_args, print_json, print_table
from zoo.model.accounting import account
from zoo.model.build import build
from zoo.model.memory import estimate, gib
from zoo.recipe.recipe import load_recipe


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("build", help="build a recipe's model (allocating nothing) and count parameters, FLOPs and "
                                     "the memory to train and to run it")
    add_recipe_args(p)
    p.add_argument("--seq-len", type=int, default=None, metavar="N",
                   help="context length for attention FLOPs (default model.max_seq_len)")
    p.add_argument("--print-model", action="store_true", help="also print the module tree")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return p


def human(key: str, n: object) -> str:
    """The short form of a large figure: counts 1234567 -> '1.23M' (B = billions), bytes in binary units
    (25904021504 -> '24.1 GiB'); '' for small figures and for lengths (seq_len)."""
    if not isinstance(n, (int, float)) or abs(n) < 1e3 or key == "seq_len":
        return ""
    if "bytes" in key:
        units = (("TiB", 2 ** 40), ("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10))
        return next(f"{_digits3(n / scale)} {unit}" for unit, scale in units if abs(n) >= scale)
    return next(f"{_digits3(n / scale)}{unit}" for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3))
                if abs(n) >= scale)


def _digits3(x: float) -> str:
    """About three significant digits, never in exponent form: 1.23, 12.3, 123, 1000."""
    return f"{x:.{2 if abs(x) < 10 else 1 if abs(x) < 100 else 0}f}"


def exact(v: object) -> str:
    """Integers (and integral counts held as floats) with thousands separators, fractions to 4 places."""
    if isinstance(v, float) and v.is_integer() and abs(v) >= 1:
        v = int(v)
    return f"{v:,}" if isinstance(v, int) else f"{v:.4f}" if isinstance(v, float) else str(v)


def run(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    if args.seq_len is not None and args.seq_len < 1:
        raise UsageError(f"zoo build: --seq-len must be >= 1, got {args.seq_len}")
    model = build(recipe, device="meta")
    stats = account(model, seq_len=args.seq_len).to_dict()
    t = recipe.train
    memory = estimate(model, max(1, t.batch_size // t.grad_accum), t.seq_len, t.precision).to_dict()
    if args.json:
        print_json({"recipe": recipe.source, "name": recipe.name, **stats, "memory": memory})
        return 0
    if args.print_model:
        print(model)
        print()
    print(f"{recipe.name or recipe.source}  ({recipe.source}, built on the meta device)")
    scalars = [[k, exact(v), human(k, v)] for k, v in stats.items() if not isinstance(v, dict)]
    print_table(scalars)
    for key, value in stats.items():
        if not isinstance(value, dict) or not value:
            continue
        print(f"\n{key}:")
        columns = list(dict.fromkeys(c for row in value.values() for c in row))
        print_table([[name] + [exact(row.get(c, "")) for c in columns] for name, row in value.items()],
                    [key.removeprefix("by_").upper()] + [c.upper() for c in columns])
    print(f"\nmemory (estimated, one process; training at {memory['micro_batch']} x {memory['seq_len']} tokens, "
          f"{t.precision}):")
    print_table([[k, exact(v), gib(v) if k not in ("micro_batch", "seq_len", "ranks", "activations_per_token") else ""]
                 for k, v in memory.items()])
    return 0
