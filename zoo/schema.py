"""Schema primitives: config fields, block specs, and validation of plain TOML data against them.

A config dataclass declares each field with `param(default, doc, ge=..., ...)`; a field
declared with `slot_field("ffn", default, doc)` holds a registered block: a table with
`kind` plus that kind's own fields, validated against the schema that kind registered.
A leaf module: it imports only `zoo.errors`; the registry a `Validator` asks is passed in.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import re
import sys
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Union

from zoo.errors import RecipeError, UnknownNameError, did_you_mean, one_of

# Slots whose specs may override their settings per projection role (`roles = { down = {...} }`).
ROLE_SLOTS = ("weights", "sparsity")


def join_key(path: str, key: Any) -> str:
    """'model.ffn' + 'hidden' -> 'model.ffn.hidden' (odd keys quoted), the form every error names."""
    key = str(key)
    if not re.fullmatch(r"[A-Za-z0-9_\-\[\].]+", key):
        key = json.dumps(key, ensure_ascii=False)
    return f"{path}.{key}" if path else key


def deep_merge(base: dict, top: dict) -> dict:
    """Tables merge key by key (top wins); every other value, arrays included, is replaced.

    A block table whose `kind` differs from the base's replaces it whole (the kinds' keys differ).
    """
    out = copy.deepcopy(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and v.get("kind", out[k].get("kind")) == out[k].get(
                "kind"):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def origin_of(path: str, origins: Mapping[str, str]) -> str | None:
    """The file that set the key at `path` (or the nearest table above it), if recorded."""
    while path:
        if path in origins:
            return origins[path]
        path = path[: max(path.rfind("."), path.rfind("["), 0)]
    return None


def located(err: RecipeError, source: str, origins: Mapping[str, str]) -> RecipeError:
    """`err` (raised naming `source`) naming instead the file that set its key, when that is another."""
    file = origin_of(err.path or "", origins)
    if file is None or file == err.file or (err.file or None) != (source or None):
        return err
    return RecipeError(err.reason, file=file, path=err.path)


@contextlib.contextmanager
def errors_located(source: str, origins: Mapping[str, str]) -> Iterator[None]:
    """Checks made after validation (building, data, devices) raise naming the recipe's `source`; re-raise
    them naming the file that set the key: a `--set` value is `<overrides>`, an inherited key its base."""
    try:
        yield
    except RecipeError as err:
        moved = located(err, source, origins)
        if moved is err:
            raise
        raise moved from None


def inline_toml(v: Any) -> str:
    """A value as it would be written in a recipe or a `--set` (inline tables for dicts); '' for None."""
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {inline_toml(x)}" for k, x in v.items()) + " }" if v else "{}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(inline_toml(x) for x in v) + "]"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    return "" if v is None else repr(v)


def flatten(d: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}; arrays stay values."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def recipe_changes(old: dict, new: dict, ignore: Callable[[str], bool] = lambda key: False) -> list[str]:
    """'key: old -> new' (values as TOML, 'unset' when absent) for each key path where two recipes' data
    differ, sorted; keys for which `ignore(key)` is true are left out."""
    a, b = flatten(old), flatten(new)
    return [f"{k}: {inline_toml(a[k]) if k in a else 'unset'} -> {inline_toml(b[k]) if k in b else 'unset'}"
            for k in sorted(set(a) | set(b)) if not ignore(k) and a.get(k) != b.get(k)]


class Invalid(ValueError):
    """Raised by a config's `check()` for a cross-field problem: `Invalid(key, message)`."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key, self.message = key, message


class _PathMarker:
    """Marks a str field as a file or folder path (see `PathStr`)."""


PATH = _PathMarker()
# A file or folder path. A relative one is taken relative to the recipe file that set it (a `--set`
# value or a recipe built from a string or dict: relative to the working directory); validation makes it
# absolute, so a recipe saved elsewhere (a run folder's recipe.toml) still names the same file.
PathStr = Annotated[str, PATH]
MODEL = _PathMarker()
MODELS = "pretrained"  # the registry slot of the catalogue's model names (zoo.io.pretrained)
# A model: a checkpoint or run folder (as PathStr), or the name of a model in the pretrained catalogue
# (a kind of registry slot MODELS), kept as given when nothing of that name is next to the file that set it.
ModelStr = Annotated[str, MODEL]


def param(default: Any = dataclasses.MISSING, doc: str = "", *, ge=None, gt=None, le=None, lt=None) -> Any:
    """A documented config field with optional numeric bounds."""
    meta = {"doc": doc, "ge": ge, "gt": gt, "le": le, "lt": lt}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda d=default: typing.cast(Any, type(d))(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class BlockSpec:
    """A chosen block: slot, kind, its validated config, and per-role overrides.

    `parents` is the role tree of the registry that validated the spec ({role: parent or None}).
    """

    slot: str
    kind: str
    config: Any
    roles: dict[str, BlockSpec] = field(default_factory=dict)
    path: str = field(default="", compare=False)
    parents: Mapping[str, str | None] = field(default_factory=dict, compare=False, repr=False)

    def for_role(self, role: str) -> BlockSpec:
        """The spec that applies to a projection of `role` (an override of it, else of its parents, else self)."""
        r: str | None = role
        while r is not None:
            if r in self.roles:
                return self.roles[r]
            r = self.parents.get(r)
        return self

    def to_dict(self) -> dict:
        out = {"kind": self.kind, **to_plain(self.config)}
        if self.roles:
            out["roles"] = {r: s.to_dict() for r, s in self.roles.items()}
        return out


def slot_field(slot: str, default: dict | None, doc: str) -> Any:
    """A field holding a block of `slot`; `default` is its TOML table (validated on use)."""
    return field(default=None if default is None else _Raw(default), metadata={"doc": doc, "slot": slot})


@dataclass(frozen=True)
class _Raw:
    """A default given as TOML data, validated like user input when the config is built."""

    data: dict


def to_plain(obj: Any) -> Any:
    """Config objects -> TOML-ready builtins (None values are left out)."""
    if isinstance(obj, BlockSpec):
        return obj.to_dict()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {}
        for f in dataclasses.fields(obj):
            if not f.init or f.metadata.get("internal"):
                continue
            v = to_plain(getattr(obj, f.name))
            if v is not None:
                out[f.name] = v
        return out
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj


def unsupported_field(cls: type) -> str | None:
    """What makes config dataclass `cls` unusable in a recipe ('field x has type set, ...'), or None."""
    try:
        hints = typing.get_type_hints(cls, include_extras=True)
    except Exception as err:  # a forward reference to a name that does not exist, ...
        return f"its type hints cannot be resolved ({type(err).__name__}: {err})"
    for f in dataclasses.fields(cls):
        if f.init and not f.metadata.get("internal") and not f.metadata.get("slot"):
            bad = _unsupported_type(hints[f.name])
            if bad:
                return f"field {f.name!r} has type {bad}, which a TOML recipe cannot hold"
    return None


def _unsupported_type(tp: Any) -> str | None:
    """The part of type `tp` that Validator.value cannot validate, or None (mirrors its cases)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        return _unsupported_type(args[0])
    if tp in (Any, bool, int, float, str, type(None)) or origin is Literal:
        return None
    if origin in (Union, types.UnionType, tuple, list, dict):
        inner = args[1:] if origin is dict else args
        return next((bad for a in inner if a is not Ellipsis and (bad := _unsupported_type(a))), None)
    if dataclasses.is_dataclass(tp):
        problem = unsupported_field(tp)
        return f"{tp.__name__} ({problem})" if problem else None
    return getattr(tp, "__name__", None) or str(tp)


@dataclass
class Validator:
    """Carries the file name and the registry through one validation."""

    file: str | None
    registry: Any
    origins: dict[str, str] | None = None  # {key path: file that set it}, from read_with_extends

    def error(self, path: str, message: str) -> RecipeError:
        return RecipeError(message, file=self.file, path=path)

    def absolute(self, value: str, path: str, name_ok: bool = False) -> str:
        """A `PathStr` value made absolute: relative to the folder of the file that set key `path`.
        `name_ok` (a `ModelStr`): a catalogue model's name naming nothing there stays as given."""
        file = origin_of(path, self.origins or {}) or self.file
        base = os.path.dirname(os.path.abspath(file)) if file and os.path.isfile(file) else os.getcwd()
        found = os.path.normpath(os.path.join(base, os.path.expanduser(value)))
        names = self.registry.kinds(MODELS) if name_ok and MODELS in self.registry.slots else ()
        return value if value in names and not os.path.exists(found) else found

    # -- dataclasses -----------------------------------------------------------------------
    def dataclass(self, cls: type, data: Any, path: str, *, ignore: tuple[str, ...] = ()) -> Any:
        if not isinstance(data, dict):
            raise self.error(path, f"expected a table, got {_describe(data)}")
        hints = typing.get_type_hints(cls, include_extras=True)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init and not f.metadata.get("internal")}
        for key in data:
            if key not in fields and key not in ignore:
                raise self.error(
                    join_key(path, key),
                    f"unknown key{did_you_mean(key, fields)}; " + (f"valid keys: {', '.join(fields)}" if fields
                                                                    else "this block takes no settings besides kind"),
                )
        values = {}
        for name, f in fields.items():
            sub = join_key(path, name)
            slot = f.metadata.get("slot")
            if name in data:
                raw = data[name]
            elif isinstance(f.default, _Raw):
                raw = f.default.data
            elif dataclasses.is_dataclass(hints[name]):
                raw = {}  # a whole section left out: its defaults, validated like any input
            elif f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
                continue
            else:
                raise self.error(sub, "required key is missing")
            if slot is not None:
                default = f.default.data if isinstance(f.default, _Raw) else None
                if isinstance(raw, dict) and "kind" not in raw and default is not None:
                    raw = deep_merge(default, raw)  # `[model.ffn] hidden = 512` keeps the default kind
                values[name] = None if raw is None else self.block(slot, raw, sub)
            else:
                values[name] = self.value(hints[name], raw, sub)
            self._bounds(f, values[name], sub)
        obj = cls(**values)
        check = getattr(obj, "check", None)
        if check is not None:
            try:
                check()
            except Invalid as err:
                raise self.error(join_key(path, err.key), err.message) from None
        return obj

    def _bounds(self, f: dataclasses.Field, v: Any, path: str) -> None:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            return
        m = f.metadata
        for key, ok, word in (("ge", lambda a, b: a >= b, ">="), ("gt", lambda a, b: a > b, ">"),
                              ("le", lambda a, b: a <= b, "<="), ("lt", lambda a, b: a < b, "<")):
            bound = m.get(key)
            if bound is not None and not ok(v, bound):
                raise self.error(path, f"must be {word} {bound}, got {v}")

    # -- blocks ----------------------------------------------------------------------------
    def block(self, slot: str, data: Any, path: str, *, allow_roles: bool = True) -> BlockSpec:
        if isinstance(data, str):
            data = {"kind": data}
        if not isinstance(data, dict):
            raise self.error(path, f"expected a table with 'kind' (or a kind name), got {_describe(data)}")
        if "kind" not in data:
            raise self.error(join_key(path, "kind"), f"missing; {slot} kinds: {', '.join(self.registry.kinds(slot))}")
        kind = data["kind"]
        if not isinstance(kind, str):
            raise self.error(join_key(path, "kind"), f"expected a string, got {_describe(kind)}")
        try:
            entry = self.registry.get(slot, kind)
        except UnknownNameError as err:
            raise self.error(join_key(path, "kind"), str(err)) from None
        roles_ok = allow_roles and slot in ROLE_SLOTS
        with entry.blame("validating", path, self.file):  # a plugin's check() with a bug: name the plugin
            config = self.dataclass(entry.config, {k: v for k, v in data.items() if k != "kind"}, path,
                                    ignore=("roles",) if roles_ok else ())
        roles, parents = {}, self.registry.roles if roles_ok else {}
        if roles_ok and "roles" in data:
            table = data["roles"]
            if not isinstance(table, dict):
                raise self.error(join_key(path, "roles"), f"expected a table of roles, got {_describe(table)}")
            for role, over in table.items():
                rpath = join_key(join_key(path, "roles"), role)
                if role not in parents:
                    raise self.error(rpath, f"unknown role{did_you_mean(role, parents)}; {one_of(parents)}")
                if not isinstance(over, dict):
                    raise self.error(rpath, f"expected a table, got {_describe(over)}")
                base = {k: v for k, v in data.items() if k != "roles"}
                merged = dict(over) if over.get("kind", kind) != kind else deep_merge(base, over)
                roles[role] = self.block(slot, merged, rpath, allow_roles=False)
        return BlockSpec(slot, kind, config, roles, path, parents)

    # -- plain values ----------------------------------------------------------------------
    def value(self, tp: Any, v: Any, path: str) -> Any:
        origin = typing.get_origin(tp)
        if origin is Annotated:
            inner, *marks = typing.get_args(tp)
            out = self.value(inner, v, path)
            if isinstance(out, str) and (PATH in marks or MODEL in marks):
                return self.absolute(out, path, name_ok=MODEL in marks)
            return out
        if tp is Any:
            return v
        if origin in (Union, types.UnionType):
            args = typing.get_args(tp)
            if v is None and type(None) in args:
                return None
            alone = [a for a in args if a is not type(None)]
            if len(alone) == 1:  # `X | None`: X's own error, with its key path
                return self.value(alone[0], v, path)
            errors = []
            for a in (a for a in args if a is not type(None)):
                try:
                    return self.value(a, v, path)
                except RecipeError as err:
                    errors.append(err.reason)
            raise self.error(path, " or ".join(errors))
        if origin is Literal:
            choices = typing.get_args(tp)
            if v not in choices:
                raise self.error(path, f"invalid value {v!r}{did_you_mean(v, choices)}; {one_of(map(str, choices))}")
            return v
        if origin in (tuple, list):
            if not isinstance(v, list | tuple):
                raise self.error(path, f"expected an array, got {_describe(v)}")
            args = typing.get_args(tp)
            if origin is tuple and args and Ellipsis not in args:  # fixed length, a type per position
                if len(v) != len(args):
                    raise self.error(path, f"expected an array of {len(args)} values, got {len(v)}")
            else:
                args = (args or (Any,))[:1] * len(v)
            return tuple(self.value(a, x, f"{path}[{i}]") for i, (a, x) in enumerate(zip(args, v)))
        if origin is dict:
            if not isinstance(v, dict):
                raise self.error(path, f"expected a table, got {_describe(v)}")
            _, vt = typing.get_args(tp) or (str, Any)
            return {str(k): self.value(vt, x, join_key(path, k)) for k, x in v.items()}
        if dataclasses.is_dataclass(tp):
            return self.dataclass(tp, v, path)
        if tp is bool:
            if not isinstance(v, bool):
                raise self.error(path, f"expected true or false, got {_describe(v)}")
            return v
        if tp is int:
            if isinstance(v, bool) or not isinstance(v, int):
                raise self.error(path, f"expected an integer, got {_describe(v)}")
            return v
        if tp is float:
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise self.error(path, f"expected a number, got {_describe(v)}")
            if isinstance(v, int) and abs(v) > sys.float_info.max or not math.isfinite(v):
                raise self.error(path, f"expected a finite number, got {v}")
            return float(v)
        if tp is str:
            if not isinstance(v, str):
                raise self.error(path, f"expected a string, got {_describe(v)}")
            return v
        raise TypeError(f"schema type {tp!r} at {path} is not supported")


def _describe(v: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
             list: "an array", dict: "a table"}
    return f"{names.get(type(v), type(v).__name__)} ({v!r})" if not isinstance(v, dict | list) else names[type(v)]
