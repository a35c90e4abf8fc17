"""`zoo show RECIPE|SLOT.KIND`: a recipe as TOML, or a block's config fields from its dataclass."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import tomli_w

from zoo.cli import UsageError, print_json, print_table
from zoo.errors import did_you_mean
from zoo.recipe.loader import add_set_argument
from zoo.recipe.recipe import read_recipe_data, recipe_from_dict
from zoo.registry import Entry, describe_config, get_registry
from zoo.schema import inline_toml, to_plain


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("show", help="print a recipe (as TOML) or a block's config fields, types, defaults and docs")
    p.add_argument("target", metavar="RECIPE|SLOT.KIND", help='a .toml recipe file, or a block such as "ffn.glu"')
    p.add_argument("--resolved", action="store_true",
                   help="for a recipe: every key, defaults filled in (loading this output gives an equal recipe)")
    add_set_argument(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of TOML / a table")
    return p


def block_info(entry: Entry) -> dict[str, Any]:
    """A block's description and fields as plain data (for JSON and the reference docs)."""
    return {
        "slot": entry.slot, "kind": entry.kind, "doc": entry.doc,
        "plugin": entry.plugin.name, "distribution": entry.plugin.dist, "version": entry.plugin.version,
        "fields": [{"name": f.name, "type": f.type, "default": to_plain(f.default), "required": f.required,
                    "bounds": f.bounds, "doc": f.doc} for f in describe_config(entry.config)],
    }


def show_block(entry: Entry, as_json: bool) -> None:
    if as_json:
        print_json(block_info(entry))
        return
    print(f"{entry.slot}.{entry.kind}: {entry.doc}")
    print(f"  registered by plugin {entry.plugin.name!r} ({entry.plugin.dist} {entry.plugin.version})")
    fields = describe_config(entry.config)
    if not fields:
        print("  no config fields: `kind` alone selects it")
        return
    print()
    print_table([[f.name, f.type, "(required)" if f.required else inline_toml(f.default), f.bounds, f.doc]
                 for f in fields], ["FIELD", "TYPE", "DEFAULT", "BOUNDS", "DESCRIPTION"])


def find_block(name: str) -> Entry:
    registry = get_registry()
    slot, _, kind = name.partition(".")
    if slot in registry.slots and kind:
        return registry.get(slot, kind)
    if name in registry.slots:
        kinds = registry.kinds(name)
        raise UsageError(f"zoo show: {name!r} is a slot; " + (f"its kinds: {', '.join(kinds)} (zoo show {name}.KIND)"
                                                              if kinds else "no kinds are registered for it"))
    names = [f"{s}.{k}" for s, k in registry.entries]
    raise UsageError(f"zoo show: {name!r} is neither a recipe file nor a registered SLOT.KIND"
                     f"{did_you_mean(name, names)}; see zoo list")


def run(args: argparse.Namespace) -> int:
    path = Path(args.target)
    if not (path.suffix == ".toml" or path.exists()):
        if args.overrides or args.resolved:
            raise UsageError("zoo show: --set and --resolved apply to a recipe file, not to a block")
        show_block(find_block(args.target), args.json)
        return 0
    origins: dict[str, str] = {}
    written = read_recipe_data(path, args.overrides, origins)
    recipe = recipe_from_dict(written, source=str(path), origins=origins)  # validates even when printing as written
    data = recipe.to_dict() if args.resolved else written
    if args.json:
        print_json(data)
    else:
        print(tomli_w.dumps(data), end="")
    return 0
