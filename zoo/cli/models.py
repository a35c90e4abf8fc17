"""`zoo models [--json]`: the pretrained catalogue, whether each model is installed, and how to install it."""

from __future__ import annotations

import argparse

from zoo.cli import print_json, print_table
from zoo.io.pretrained import names, status


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("models", help="pretrained models by name (plugins register them): installed or not, "
                                      "and the command that installs each")
    p.add_argument("--json", action="store_true", help="print one JSON array instead of a table")
    return p


def run(args: argparse.Namespace) -> int:
    rows = [status(name) for name in names()]
    if args.json:
        print_json(rows)
        return 0
    if not rows:
        print("no pretrained models registered (a plugin adds them; see docs/models.md)")
        return 0
    def state(r: dict) -> str:
        if not r["installed"]:
            return f"not installed: {r['install']}"
        return "imported" if r["imported"] else "installed (imported on first use)"

    print_table([[r["name"], r["architecture"], f"{r['parameters'] / 1e6:.0f}M", r["license"], ",".join(r["tags"]),
                  state(r)] for r in rows], ["NAME", "ARCH", "PARAMS", "LICENSE", "TAGS", "STATUS"])
    return 0
