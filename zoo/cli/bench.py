"""`zoo bench NAME`: benchmarks (not tests). Each module in zoo/bench/ is one benchmark,
found automatically: it defines `add_arguments(parser)` and `run(args) -> int`, and its
docstring's first line is the help text."""

from __future__ import annotations

import importlib
import pkgutil

import zoo.bench
from zoo.cli import UsageError


def add_parser(sub):
    p = sub.add_parser("bench", help="run a benchmark and print ratios against its baseline")
    names = p.add_subparsers(dest="bench", metavar="NAME", parser_class=type(p))
    for info in sorted(pkgutil.iter_modules(zoo.bench.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"zoo.bench.{info.name}")
        doc = (module.__doc__ or "").strip().splitlines()
        b = names.add_parser(info.name.replace("_", "-"), help=doc[0] if doc else "")
        b.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
        module.add_arguments(b)
        b.set_defaults(_bench=module.run)
    p.set_defaults(_bench=None)
    return p


def run(args) -> int:
    if args._bench is None:
        raise UsageError("zoo bench: name a benchmark (see zoo bench --help)")
    return args._bench(args)
