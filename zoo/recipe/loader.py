"""TOML -> plain data: `extends` inheritance (deep merge, cycles caught) and `a.b=c` overrides."""

from __future__ import annotations

import copy
import os
import re
import sys
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from zoo.errors import RecipeError
from zoo.registry import get_registry
from zoo.schema import MODELS, deep_merge, join_key

OVERRIDES = "<overrides>"


def _mark(data: Any, prefix: str, file: str, origins: dict[str, str]) -> None:
    """Record `file` as the origin of `prefix` and every key below it."""
    origins[prefix] = file
    if isinstance(data, dict):
        for k, v in data.items():
            _mark(v, join_key(prefix, k), file, origins)


MAX_DEPTH = 32  # tables and arrays nested deeper than this are surely a mistake (and would exhaust the stack)


def parse_toml(text: str, file: str) -> dict:
    """TOML text -> data; malformed or absurdly nested text is a RecipeError naming `file`."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise RecipeError(f"malformed TOML: {err}", file=file) from None
    except RecursionError:
        data = None
    deep = _too_deep(data)
    if data is None or deep is not None:
        raise RecipeError(f"arrays or tables nested deeper than {MAX_DEPTH} levels", file=file, path=deep)
    return data


def _too_deep(data: Any) -> str | None:
    """The key path of a value nested deeper than MAX_DEPTH, else None (iterative: no recursion)."""
    stack = [(data, "", 0)]
    while stack:
        node, path, depth = stack.pop()
        if depth > MAX_DEPTH:
            return path or None
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for k, v in items:
            stack.append((v, f"{path}[{k}]" if isinstance(node, list) else f"{path}.{k}" if path else str(k),
                          depth + 1))
    return None


def read_toml(path: Path) -> dict:
    """One TOML file as plain data; RecipeError naming the file (and line/column) when it cannot be read."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError("file not found", file=str(path)) from None
    except IsADirectoryError:
        raise RecipeError("is a folder, expected a .toml recipe file", file=str(path)) from None
    except (OSError, UnicodeDecodeError) as err:
        raise RecipeError(f"cannot read: {err}", file=str(path)) from None
    return parse_toml(text, str(path))


def is_file(path: Path) -> bool:
    """Path.is_file, but a name the OS rejects (too long, NUL byte) is simply not a file."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def read_with_extends(path: str | Path, _stack: tuple[Path, ...] = (), *,
                      origins: dict[str, str] | None = None) -> dict:
    """The file's data merged over what it `extends` (a path relative to the file).

    `origins`, when given, is filled with {dotted key path: file that set it} for error messages.
    """
    path = Path(path)
    real = path.resolve()
    if real in _stack:
        chain = " -> ".join(p.name for p in (*_stack, real))
        raise RecipeError(f"cyclic extends: {chain}", file=str(path), path="extends")
    data = read_toml(path)
    parent = data.pop("extends", None)
    if parent is None:
        if origins is not None:
            _mark(data, "", str(path), origins)
        return data
    if not isinstance(parent, str):
        raise RecipeError("expected a path string (relative to this file)", file=str(path), path="extends")
    target = path.parent / parent
    if not is_file(target) and (folder := catalogue_checkpoint(parent)) is not None:
        target = folder / "recipe.toml"
    if not is_file(target):
        raise RecipeError(f"extends {parent!r}, which does not exist ({target})", file=str(path), path="extends")
    base = read_with_extends(target, (*_stack, real), origins=origins)
    if origins is not None:
        _mark(data, "", str(path), origins)
    return deep_merge(base, data)


def catalogue_names() -> list[str]:
    registry = get_registry()
    return registry.kinds(MODELS) if MODELS in registry.slots else []


def _exists(path: Path) -> bool:
    """Path.exists, but a name the OS rejects (too long, NUL byte) simply does not exist."""
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


def catalogue_checkpoint(value: str | os.PathLike) -> Path | None:
    """The checkpoint folder of catalogue model `value` (imported on first use by its entry), or None when
    `value` is no model's name or is a path that exists (a path wins)."""
    text = os.fspath(value)
    if text not in catalogue_names() or _exists(Path(text)):
        return None
    return get_registry().get(MODELS, text).factory().checkpoint(text)


def add_set_argument(parser, what: str = "a recipe key") -> None:
    """The one definition of the command-line option `--set KEY=VALUE` (repeatable, read by parse_override
    in order; `args.overrides`)."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override {what}, e.g. --set model.n_layers=8 (repeatable; the value is TOML, else "
                             "a bare string; docs/recipes.md)")


def parse_override(item: str) -> tuple[list[str], Any]:
    """'a.b.c=value' -> (['a','b','c'], value); value is TOML, else taken as a bare string."""
    key, sep, raw = item.partition("=")
    keys = [k.strip() for k in key.strip().split(".")]
    if not sep or not all(keys):
        raise RecipeError(f"override {item!r} is not of the form key.path=value", file=OVERRIDES)
    try:
        value = parse_toml(f"v = {raw.strip()}", OVERRIDES)["v"]
    except RecipeError as err:
        if "nested deeper" in err.reason:
            raise
        value = raw.strip()
    return keys, value


def _steps(keys: list[str]) -> list[str | int]:
    """['model', 'layers[1]', 'ffn'] -> ['model', 'layers', 1, 'ffn']: array indices become steps."""
    steps: list[str | int] = []
    for k in keys:
        m = re.fullmatch(r"([^\[\]]+)((?:\[\d+\])*)", k)
        if m is None:
            raise RecipeError(f"bad key {k!r} in override path {'.'.join(keys)!r}", file=OVERRIDES)
        steps += [m.group(1), *(int(i) for i in re.findall(r"\d+", m.group(2)))]
    return steps


_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array", dict: "a table"}


def _dotted(steps: list[str | int]) -> str:
    return "".join(f"[{s}]" if isinstance(s, int) else f".{s}" for s in steps).lstrip(".")


def apply_overrides(data: dict, overrides: list[str] | dict[str, Any] | None, *,
                    origins: dict[str, str] | None = None) -> dict:
    """A copy of `data` with each `a.b.c=value` set (tables created as needed, `layers[1].x` indexes arrays).

    The overridden key paths are marked as coming from OVERRIDES in `origins`.
    """
    items = overrides.items() if isinstance(overrides, dict) else [parse_override(o) for o in overrides or []]
    out = copy.deepcopy(data)
    for keys, value in items:
        steps = _steps(keys.split(".") if isinstance(keys, str) else list(keys))
        if len(steps) > MAX_DEPTH:
            raise RecipeError(f"key path nested deeper than {MAX_DEPTH} levels", file=OVERRIDES,
                              path=_dotted(steps[:MAX_DEPTH]) + ".…")
        node: Any = out
        for i, step in enumerate(steps):
            here = _dotted(steps[: i + 1])
            last = i == len(steps) - 1
            if isinstance(step, int):
                if not isinstance(node, list):
                    raise RecipeError(f"is {_NAMES.get(type(node), type(node).__name__)}, not an array", file=OVERRIDES,
                                      path=_dotted(steps[:i]))
                if step >= len(node):
                    raise RecipeError(f"index out of range: the array has {len(node)} entries", file=OVERRIDES,
                                      path=here)
            elif not isinstance(node, dict):
                raise RecipeError(f"cannot set a key inside {_NAMES.get(type(node), type(node).__name__)}",
                                  file=OVERRIDES, path=_dotted(steps[:i]))
            if last:
                node[step] = value
            else:
                if isinstance(steps[i + 1], int) and isinstance(step, str) and step not in node:
                    raise RecipeError(f"the recipe has no array here for [{steps[i + 1]}] to index; set the whole "
                                      f"array instead, e.g. --set '{here}=[{{...}}]'", file=OVERRIDES, path=here)
                nxt = node[step] if isinstance(step, int) else node.setdefault(step, {})
                if isinstance(nxt, str) and not isinstance(steps[i + 1], int):
                    nxt = node[step] = {"kind": nxt}  # a block given by kind name: `ffn = "mlp"` + `ffn.hidden=`
                node = nxt
        if origins is not None:
            _mark(value, _dotted(steps), OVERRIDES, origins)
    return out
