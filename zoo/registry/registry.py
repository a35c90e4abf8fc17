"""The block catalogue: for each slot, the registered kinds with their config schema and factory; the
projection roles; and the one way a block is built (`Registry.build`)."""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import types
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from zoo.contracts import check
from zoo.errors import PluginCollisionError, PluginError, RecipeError, UnknownNameError, ZooError, did_you_mean, one_of
from zoo.schema import MODEL, PATH, BlockSpec, Invalid, Validator, unsupported_field

# The slots every zoo knows; plugins may add more with `registry.add_slot`.
CORE_SLOTS = {
    "attention": "self-attention block: forward(x, rope, cache) -> x",
    "norm": "normalisation layer over the last dimension",
    "ffn": "feed-forward block (dense or mixture of experts)",
    "activation": "elementwise activation used inside FFNs",
    "weights": "how a projection stores and applies its weight (precision, quantisation)",
    "sparsity": "what a projection does to its input before the matmul",
    "position": "positional encoding applied to queries and keys",
    "router": "chooses experts for each token in a mixture-of-experts FFN",
    "kernel-backend": "implementation of the hot operations (torch, triton, ...)",
    "dataset": "where training text comes from",
    "tokenizer": "text <-> token ids",
    "optimizer": "parameter update rule",
    "schedule": "learning-rate schedule",
}

# Roles of projections; `weights` and `sparsity` specs may override any of them. A role falls back
# along its parent (expert_down -> down -> the section itself). Plugins add roles with `registry.add_role`.
CORE_ROLES: dict[str, str | None] = {
    "qkv": None, "o": None, "up_gate": None, "down": None,
    "expert_up_gate": "up_gate", "expert_down": "down",
    "shared_up_gate": "up_gate", "shared_down": "down",
}
# Roles whose projection adds its output to the residual stream (init scales their weights by
# 1/sqrt(2·n_layers)); a role without a declaration takes its parent's.
CORE_RESIDUAL: dict[str, bool] = {"qkv": False, "o": True, "up_gate": False, "down": True}


@dataclass(frozen=True)
class PluginInfo:
    """Who registered an entry: plugin (entry-point) name and its distribution. `core`: zoo's own blocks,
    whose bugs surface as tracebacks instead of being blamed on a plugin."""

    name: str
    dist: str
    version: str
    core: bool = False


@dataclass(frozen=True)
class Entry:
    """One registered block: where it plugs in, its config schema, factory and who registered it."""

    slot: str
    kind: str
    config: type
    factory: Callable[..., Any]
    doc: str
    plugin: PluginInfo

    @contextmanager
    def blame(self, doing: str, path: str, file: str | None = None) -> Iterator[None]:
        """Around a call into this entry's code (`doing`, e.g. "building", the block at key path `path`):
        `Invalid(key, msg)` becomes a RecipeError at `path.key` of `file`; any other exception that is not
        a ZooError becomes a PluginError naming the plugin (zoo's own blocks: left as the bug it is)."""
        try:
            yield
        except Invalid as err:
            raise RecipeError(err.message, file=file, path=".".join(p for p in (path, err.key) if p) or None) from None
        except ZooError:
            raise
        except Exception as err:
            if self.plugin.core:
                raise
            raise PluginError(f"plugin {self.plugin.name!r} ({self.plugin.dist}): {doing} {self.slot}.{self.kind} "
                              f"at {path or '?'} failed: {type(err).__name__}: {err}") from err


@dataclass(frozen=True)
class FieldInfo:
    """One config field as users see it: `slot` is set for a nested block, `bounds` e.g. ">= 1, <= 64"."""

    name: str
    type: str
    default: Any
    doc: str
    required: bool
    slot: str | None = None
    bounds: str = ""


def _type_name(tp: Any) -> str:
    """A type as a recipe author reads it: int, float | None, "a" | "b", array of float, table."""
    if isinstance(tp, str):
        return tp
    origin, args = typing.get_origin(tp), [a for a in typing.get_args(tp) if a is not Ellipsis]
    if origin is typing.Annotated:
        return "path" if PATH in args[1:] else "path | model name" if MODEL in args[1:] else _type_name(args[0])
    if origin is typing.Literal:
        return " | ".join(json.dumps(a) if isinstance(a, str) else repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin in (tuple, list):
        return "array of " + (" | ".join(dict.fromkeys(_type_name(a) for a in args)) if args else "values")
    if origin is dict:
        return "table"
    if dataclasses.is_dataclass(tp):
        return "table"
    if tp is type(None):
        return "None"
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


_BOUNDS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))


def describe_config(config: type) -> list[FieldInfo]:
    """One FieldInfo per dataclass field: name, type, default (as TOML data), bounds and one-line doc."""
    try:
        hints = typing.get_type_hints(config, include_extras=True)
    except Exception:  # an annotation that cannot be resolved here: show it as written
        hints = {}
    out = []
    for f in dataclasses.fields(config):
        if not f.init or f.metadata.get("internal"):
            continue
        if f.default is not dataclasses.MISSING:
            default, required = f.default, False
        elif f.default_factory is not dataclasses.MISSING:
            default, required = f.default_factory(), False
        else:
            default, required = None, True
        default = getattr(default, "data", default)  # a slot field's default block table
        slot = f.metadata.get("slot")
        tp = f"{slot} block" if slot else _type_name(hints.get(f.name, f.type))
        bounds = ", ".join(f"{word} {f.metadata[key]}" for key, word in _BOUNDS if f.metadata.get(key) is not None)
        out.append(FieldInfo(f.name, tp, default, f.metadata.get("doc", ""), required, slot, bounds))
    return out


@dataclass
class Registry:
    """Slots -> kinds -> Entry, and the projection roles. Filled by plugins through the `zoo_register` hook."""

    slots: dict[str, str] = field(default_factory=lambda: dict(CORE_SLOTS))
    roles: dict[str, str | None] = field(default_factory=lambda: dict(CORE_ROLES))
    residual: dict[str, bool] = field(default_factory=lambda: dict(CORE_RESIDUAL))
    entries: dict[tuple[str, str], Entry] = field(default_factory=dict)
    plugins: dict[str, PluginInfo] = field(default_factory=dict)
    failures: dict[str, tuple[PluginInfo, str]] = field(default_factory=dict)  # skipped plugins and why
    _current: PluginInfo = PluginInfo("<direct>", "<direct>", "")

    # -- registration (called from plugins' zoo_register hooks) --------------------------
    def add_slot(self, slot: str, doc: str) -> None:
        """Declare a new slot (a new kind of block) that recipes and plugins can use."""
        self.slots.setdefault(slot, doc)

    def add_role(self, role: str, parent: str | None = None, residual: bool | None = None) -> None:
        """Declare a projection role (for blocks with projections of a new kind); recipes may then override
        `weights` and `sparsity` for it, and a role without an override falls back to `parent`. `residual`:
        whether the projection's output is added to the residual stream (None: as its parent's)."""
        if parent is not None and parent not in self.roles:
            raise PluginError(f"plugin {self._current.name!r}: role {role!r} has unknown parent {parent!r}"
                              f"{did_you_mean(parent, self.roles)}; {one_of(self.roles)}")
        if role not in self.roles:
            self.roles[role] = parent
            self.residual.pop(role, None)  # left by a plugin whose registration was rolled back
            if residual is not None:
                self.residual[role] = residual

    def role_chain(self, role: str) -> list[str]:
        """`role` and the roles it falls back to, nearest first (expert_down -> [expert_down, down])."""
        chain = [role]
        while self.roles.get(chain[-1]) is not None:
            chain.append(self.roles[chain[-1]])
        return chain

    def writes_residual(self, role: str) -> bool:
        """Whether a projection of `role` adds its output to the residual stream (its declaration, else its
        nearest ancestor's; False when none declares)."""
        return next((self.residual[r] for r in self.role_chain(role) if r in self.residual), False)

    def register(
        self, slot: str, kind: str, config: type, factory: Callable[..., Any], doc: str = ""
    ) -> None:
        """Register `kind` in `slot`: `config` is a frozen dataclass, `factory(cfg, ctx, ...)`."""
        who = self._current
        if slot not in self.slots:
            raise PluginError(
                f"plugin {who.name!r} registers into unknown slot {slot!r}{did_you_mean(slot, self.slots)};"
                f" slots are {one_of(self.slots)} (or declare one with registry.add_slot)"
            )
        if not (isinstance(config, type) and dataclasses.is_dataclass(config)):
            raise PluginError(f"plugin {who.name!r}: {slot}.{kind} config must be a dataclass, got {config!r}")
        if not config.__dataclass_params__.frozen:
            raise PluginError(f"plugin {who.name!r}: {slot}.{kind} config {config.__name__} must be frozen")
        problem = unsupported_field(config)
        if problem:
            raise PluginError(f"plugin {who.name!r}: {slot}.{kind} config {config.__name__}: {problem}")
        if "kind" in {f.name for f in dataclasses.fields(config)}:
            raise PluginError(f"plugin {who.name!r}: {slot}.{kind} config may not have a field named 'kind'")
        if not callable(factory):
            raise PluginError(f"plugin {who.name!r}: {slot}.{kind} factory is not callable")
        old = self.entries.get((slot, kind))
        if old is not None:
            raise PluginCollisionError(
                f"{slot}.{kind} is registered twice: by plugin {old.plugin.name!r} "
                f"(distribution {old.plugin.dist}) and by plugin {who.name!r} (distribution {who.dist});"
                " uninstall one, or restrict loading with ZOO_PLUGINS=name,..."
            )
        if not doc:
            text = (config.__doc__ or "").strip()
            if text.startswith(f"{config.__name__}("):  # the signature dataclasses writes when there is no docstring
                text = ""
            doc = " ".join(text.split("\n\n")[0].split()) if text else ""  # the first paragraph, on one line
        self.entries[(slot, kind)] = Entry(slot, kind, config, factory, doc, who)

    # -- specs and building ------------------------------------------------------------------
    def spec(self, slot: str, data: Any, path: str = "", file: str | None = None) -> BlockSpec:
        """A block of `slot` from TOML data (a kind name or a table with `kind`), validated as in a recipe."""
        return Validator(file, self).block(slot, data, path)

    def build(self, spec: BlockSpec, *args: Any, file: str | None = None, **kwargs: Any) -> Any:
        """THE way a block is built: `factory(spec.config, *args, **kwargs)` of spec's slot and kind, its errors
        turned into one line (see `Entry.blame`; `file` is the recipe, for error messages), the block checked
        against its slot's contract (`zoo.contracts.check`: one line naming the missing member)."""
        entry = self.get(spec.slot, spec.kind)
        with entry.blame("building", spec.path, file):
            block = entry.factory(spec.config, *args, **kwargs)
        check(entry, block, spec.path)  # the slot's contract (zoo/contracts.py)
        return block

    # -- look-up ---------------------------------------------------------------------------
    def kinds(self, slot: str) -> list[str]:
        """The kinds registered in `slot`, sorted (UnknownNameError for an unknown slot)."""
        self._check_slot(slot)
        return sorted(k for s, k in self.entries if s == slot)

    def get(self, slot: str, kind: str) -> Entry:
        """The entry of `slot`.`kind`; UnknownNameError with "did you mean" when there is none."""
        self._check_slot(slot)
        entry = self.entries.get((slot, kind))
        if entry is None:
            choices = self.kinds(slot)
            failed = f"; plugins that failed to load: {', '.join(self.failures)} (see zoo plugins)" \
                if self.failures else ""
            raise UnknownNameError(
                f"unknown {slot} kind {kind!r}{did_you_mean(kind, choices)}; registered: "
                + (", ".join(choices) or "none") + failed
            )
        return entry

    def list(self, pattern: str = "*") -> list[Entry]:
        """Entries whose 'slot.kind' matches a shell-style pattern, sorted."""
        return [e for key, e in sorted(self.entries.items()) if fnmatch.fnmatch(".".join(key), pattern)
                or fnmatch.fnmatch(key[0], pattern)]

    def by_plugin(self, plugin: str) -> list[Entry]:
        """What the plugin (entry-point name) registered."""
        return [e for _, e in sorted(self.entries.items()) if e.plugin.name == plugin]

    def _check_slot(self, slot: str) -> None:
        if slot not in self.slots:
            raise UnknownNameError(f"unknown slot {slot!r}{did_you_mean(slot, self.slots)}; {one_of(self.slots)}")
