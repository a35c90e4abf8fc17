"""`zoo plugins [--json]`: each loaded (or skipped) plugin, its distribution, version and blocks."""

from __future__ import annotations

import argparse

from zoo.cli import print_json, print_table
from zoo.registry import get_registry


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("plugins", help="list plugins: distribution, version, what each registered")
    p.add_argument("--json", action="store_true", help="print one JSON array instead of a table")
    return p


def run(args: argparse.Namespace) -> int:
    registry = get_registry()
    rows = [{"name": info.name, "distribution": info.dist, "version": info.version, "status": "loaded",
             "registered": [f"{e.slot}.{e.kind}" for e in registry.by_plugin(info.name)]}
            for info in registry.plugins.values()]
    rows += [{"name": info.name, "distribution": info.dist, "version": info.version, "status": "skipped",
              "error": error, "registered": []} for info, error in registry.failures.values()]
    if args.json:
        print_json(rows)
        return 0
    print_table([[r["name"], r["distribution"], r["version"],
                  ", ".join(r["registered"]) if r["status"] == "loaded" else f"SKIPPED: {r['error']}"]
                 for r in rows], ["PLUGIN", "DISTRIBUTION", "VERSION", "REGISTERED"])
    return 0
