"""Generate docs/reference.md from the code: recipe sections and every built-in block's config schema.

    python -m zoo.reference            # rewrite docs/reference.md
    python -m zoo.reference --check    # exit 1 when the committed file is stale

Only the built-in blocks are documented (installed plugins document themselves), so the file is
the same on every machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path

from zoo.files import write_atomic
from zoo.recipe.recipe import Recipe
from zoo.registry import FieldInfo, Registry, describe_config, load_registry
from zoo.schema import inline_toml

DEFAULT_PATH = Path("docs/reference.md")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _field_table(fields: list[FieldInfo]) -> list[str]:
    if not fields:
        return ["No fields: `kind` alone selects it.", ""]
    rows = ["| key | type | default | bounds | description |", "|---|---|---|---|---|"]
    for f in fields:
        default = "*required*" if f.required else f"`{inline_toml(f.default)}`" if f.default is not None else ""
        rows.append("| " + " | ".join(_cell(c) for c in (f"`{f.name}`", f.type, default, f.bounds, f.doc)) + " |")
    return rows + [""]


def _sections(cls: type, key: str) -> list[tuple[str, type]]:
    """(TOML table name, dataclass) for `cls` and every section nested in it, depth first."""
    out = [(key, cls)]
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init or f.metadata.get("internal") or f.metadata.get("slot"):
            continue
        tp = hints[f.name]
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        if dataclasses.is_dataclass(tp):
            out += _sections(tp, f"[{_join(key, f.name)}]")
        elif typing.get_origin(tp) is tuple and len(args) == 1 and dataclasses.is_dataclass(args[0]):
            out += _sections(args[0], f"[[{_join(key, f.name)}]]")
    return out


def _join(key: str, name: str) -> str:
    key = key.strip("[]")
    return f"{key}.{name}" if key and key != "top level" else name


def reference(registry: Registry) -> str:
    """The whole reference page as Markdown."""
    lines = ["# Recipe and block reference", "",
             "Generated from the config dataclasses by `python -m zoo.reference`; do not edit by hand.",
             "A test fails when this file is stale. Built-in blocks only: `zoo list` and `zoo show SLOT.KIND`",
             "describe installed plugins too. How recipes are written: [recipes.md](recipes.md). A `path` is",
             "relative to the recipe file that set it ([recipes.md](recipes.md#paths)).", "",
             "## Recipe sections", ""]
    for name, cls in _sections(Recipe, "top level"):
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        lines += [f"### {name if name == 'top level' else f'`{name}`'}", "", doc, ""]
        lines += _field_table(describe_config(cls))
    lines += ["## Blocks", "",
              "A block is chosen with `kind = \"...\"` in the table of its slot (or as the bare kind name,",
              '`ffn = "mlp"`); its own keys sit beside `kind`. `weights` and `sparsity` blocks also take',
              "`roles = { down = { ... } }` per-role overrides.", ""]
    for slot in sorted(registry.slots):
        kinds = registry.kinds(slot)
        lines += [f"### slot `{slot}`", "", registry.slots[slot] + ".", ""]
        if not kinds:
            lines += ["No built-in kinds.", ""]
        for kind in kinds:
            entry = registry.get(slot, kind)
            lines += [f"#### `{slot}.{kind}`", "", entry.doc, ""]
            lines += _field_table(describe_config(entry.config))
    return "\n".join(lines).rstrip() + "\n"


def builtin_reference() -> str:
    """The reference of the built-in registry (entry points left out)."""
    return reference(load_registry(include_entry_points=False))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m zoo.reference", description=__doc__.splitlines()[0])
    p.add_argument("path", nargs="?", type=Path, default=DEFAULT_PATH, help=f"output file (default {DEFAULT_PATH})")
    p.add_argument("--check", action="store_true", help="exit 1 if the file differs from what would be written")
    args = p.parse_args(argv)
    text = builtin_reference()
    if args.check:
        current = args.path.read_text(encoding="utf-8") if args.path.is_file() else ""
        if current != text:
            print(f"{args.path} is stale: run `python -m zoo.reference`", file=sys.stderr)
            return 1
        return 0
    write_atomic(args.path, text)
    print(f"wrote {args.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
