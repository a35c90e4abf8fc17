"""`zoo list [SLOT|PATTERN] [--json]`: the registered blocks, one line each."""

from __future__ import annotations

import argparse

from zoo.cli import UsageError, print_json, print_table
from zoo.errors import did_you_mean
from zoo.registry import Entry, Registry, get_registry


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("list", help="list registered blocks (all, one slot, or a slot.kind pattern)")
    p.add_argument("pattern", nargs="?", default="*", metavar="SLOT|PATTERN",
                   help='a slot ("ffn") or a shell pattern over slot.kind ("norm.*", "*glu*"); default all')
    p.add_argument("--json", action="store_true", help="print one JSON array instead of a table")
    return p


def select(registry: Registry, pattern: str) -> list[Entry]:
    """Entries of slot `pattern`, or matching it as a slot.kind pattern; UsageError when it names nothing."""
    if pattern in registry.slots:
        return registry.list(pattern)
    entries = registry.list(pattern)
    if not entries and not any(c in pattern for c in "*?["):
        names = [*registry.slots, *(f"{s}.{k}" for s, k in registry.entries)]
        raise UsageError(f"zoo list: no slot or block {pattern!r}{did_you_mean(pattern, names)}; "
                         f"slots: {', '.join(sorted(registry.slots))}")
    return entries


def run(args: argparse.Namespace) -> int:
    registry = get_registry()
    entries = select(registry, args.pattern)
    if args.json:
        print_json([{"slot": e.slot, "kind": e.kind, "doc": e.doc, "plugin": e.plugin.name,
                     "distribution": e.plugin.dist, "version": e.plugin.version} for e in entries])
        return 0
    if not entries:
        what = f"slot {args.pattern!r}" if args.pattern in registry.slots else f"pattern {args.pattern!r}"
        print(f"no blocks registered for {what}")
        return 0
    print_table([[f"{e.slot}.{e.kind}", e.plugin.name, e.doc] for e in entries], ["BLOCK", "PLUGIN", "DESCRIPTION"])
    return 0
