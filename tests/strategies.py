"""Hypothesis strategies for recipes, generated from the registered config schemas.

Valid recipes are drawn field by field from each config dataclass (types, Literal choices and
`param` bounds), and every registered kind of every slot can be drawn, so a block that lands
later is fuzzed without touching this file. Numbers stay near their lower bound, so the
models are tiny. `mutate` then breaks a valid recipe the ways users do.
"""

from __future__ import annotations

import dataclasses
import string
import types
import typing
from typing import Annotated, Any, Literal, Union

from hypothesis import strategies as st

from zoo.model.config import LayerPattern, ModelConfig
from zoo.recipe.recipe import Recipe
from zoo.registry import get_registry
from zoo.schema import ROLE_SLOTS

SPAN = 6  # valid numbers are drawn in [lower bound, lower bound + SPAN]: small models
MAX_NESTING = 4  # blocks inside blocks (an MoE's expert FFN, a GLU's activation) are drawn this deep
SHAPE_KEYS = ("d_model", "n_heads", "n_kv_heads", "head_dim")
NAME = st.text(alphabet=string.ascii_letters + "_", min_size=1, max_size=8)

# Values of the wrong type, out of range, huge, non-finite, unicode: what a typo or a bad paste gives.
JUNK = st.one_of(
    st.text(max_size=12),
    st.integers(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.sampled_from([0, -1, 2**31, 2**63, -(2**63), 10**400]),
    st.floats(),
    st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e308, -0.0, 5e-324]),
    st.booleans(),
    st.lists(st.one_of(st.integers(), st.text(max_size=4)), max_size=3),
    st.dictionaries(st.text(max_size=6), st.integers(), max_size=2),
    st.dates(),
    st.datetimes(),
)


def _number(tp: type, meta: dict) -> st.SearchStrategy:
    ge, gt, le, lt = (meta.get(k) for k in ("ge", "gt", "le", "lt"))
    if tp is int:
        lo = ge if ge is not None else gt + 1 if gt is not None else 0
        hi = le if le is not None else lt - 1 if lt is not None else lo + SPAN
        return st.integers(lo, max(lo, min(hi, lo + SPAN)))
    lo = float(ge if ge is not None else gt if gt is not None else 0.0)
    hi = float(le if le is not None else lt if lt is not None else lo + SPAN)
    return st.floats(lo, min(hi, lo + SPAN), exclude_min=gt is not None, exclude_max=lt is not None and hi <= lo + SPAN)


def value(tp: Any, f: dataclasses.Field, depth: int) -> st.SearchStrategy | None:
    """A strategy for valid values of a field's type, or None to leave the field at its default."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        return value(typing.get_args(tp)[0], f, depth)
    if origin in (Union, types.UnionType):
        options = [value(a, f, depth) for a in typing.get_args(tp) if a is not type(None)]
        options = [o for o in options if o is not None]
        return st.one_of(options) if options else None
    if origin is Literal:
        return st.sampled_from(typing.get_args(tp))
    if tp is bool:
        return st.booleans()
    if tp in (int, float):
        return _number(tp, f.metadata)
    if dataclasses.is_dataclass(tp):
        return table(tp, depth + 1)
    if tp is str:
        return st.just(f.default) if isinstance(f.default, str) else NAME
    return None  # arrays, tables and free-form values keep their defaults


def block(slot: str, depth: int = 0, roles: bool = True) -> st.SearchStrategy[dict]:
    """{"kind": k, ...fields} for any registered kind of `slot` (per-role overrides sometimes)."""
    registry = get_registry()

    def of_kind(kind: str) -> st.SearchStrategy[dict]:
        body = table(registry.get(slot, kind).config, depth + 1).map(lambda d: {"kind": kind, **d})
        if not (roles and slot in ROLE_SLOTS):
            return body
        overrides = st.dictionaries(st.sampled_from(sorted(registry.roles)), block(slot, depth + 1, roles=False),
                                    max_size=2)
        return st.tuples(body, overrides).map(lambda t: {**t[0], "roles": t[1]} if t[1] else t[0])

    return st.sampled_from(registry.kinds(slot)).flatmap(of_kind)


def table(cls: type, depth: int = 0, fixed: dict[str, st.SearchStrategy] | None = None,
          exclude: tuple[str, ...] = ()) -> st.SearchStrategy[dict]:
    """A valid TOML table for config dataclass `cls`; optional fields are sometimes left out."""
    hints = typing.get_type_hints(cls, include_extras=True)
    required, optional = {}, {}
    for f in dataclasses.fields(cls):
        if not f.init or f.metadata.get("internal") or f.name in exclude:
            continue
        slot = f.metadata.get("slot")
        if fixed and f.name in fixed:
            strategy = fixed[f.name]
        elif slot is not None:
            strategy = block(slot, depth) if depth < MAX_NESTING else None
        else:
            strategy = value(hints[f.name], f, depth)
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        if strategy is None:
            continue
        (optional if has_default else required)[f.name] = strategy
    return st.fixed_dictionaries(required, optional=optional)


MOSTLY = st.sampled_from([True] * 9 + [False])  # True 90% (and True is what hypothesis shrinks towards)


@st.composite
def shapes(draw) -> dict:
    """d_model / heads / head_dim: mostly consistent, sometimes not (then a RecipeError is due)."""
    n_heads = draw(st.integers(1, 4))
    out = {"n_heads": n_heads}
    if draw(st.booleans()):
        divisors = [d for d in range(1, n_heads + 1) if n_heads % d == 0]
        out["n_kv_heads"] = draw(st.sampled_from(divisors) if draw(MOSTLY) else st.integers(1, 5))
    head = draw(st.sampled_from([2, 4, 6, 8]) if draw(MOSTLY) else st.integers(1, 9))
    if draw(st.booleans()):
        out["head_dim"] = head
        out["d_model"] = draw(st.integers(1, 24))
    else:
        out["d_model"] = n_heads * head if draw(MOSTLY) else draw(st.integers(1, 24))
    return out


LAYER_RANGE = st.one_of(
    st.just("all"),
    st.integers(0, 7).map(str),
    st.tuples(st.integers(0, 7), st.integers(0, 7)).map(lambda t: f"{t[0]}-{t[1]}"),
    st.integers(0, 7).map(lambda a: f"{a}-"),
    st.text(max_size=6),
)


def model_table() -> st.SearchStrategy[dict]:
    patterns = st.lists(table(LayerPattern, 1, fixed={"range": LAYER_RANGE}), max_size=2)
    body = table(ModelConfig, fixed={"layers": patterns}, exclude=SHAPE_KEYS)
    return st.tuples(body, shapes()).map(lambda t: {**t[0], **t[1]})


def recipes() -> st.SearchStrategy[dict]:
    """Plain data of a recipe drawn from the schemas; mostly valid, always small."""
    return st.tuples(table(Recipe, exclude=("model",)), model_table()).map(lambda t: {**t[0], "model": t[1]})


# -- mutations ------------------------------------------------------------------------------------
def _places(data: Any, path: tuple = ()) -> list[tuple]:
    """Every (path to a container, key) in nested dicts and lists."""
    out = []
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for k, v in items:
        out.append((path, k))
        out.extend(_places(v, (*path, k)))
    return out


def _tables(data: Any, path: tuple = ()) -> list[tuple]:
    out = [path] if isinstance(data, dict) else []
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for k, v in items:
        out.extend(_tables(v, (*path, k)))
    return out


def _at(data: Any, path: tuple) -> Any:
    for k in path:
        data = data[k]
    return data


def _near_miss(word: str) -> st.SearchStrategy[str]:
    """A typo of `word`: a letter dropped, doubled or changed, or the case changed."""
    if not word:
        return NAME
    i = st.integers(0, len(word) - 1)
    return st.one_of(
        i.map(lambda j: word[:j] + word[j + 1:]),
        i.map(lambda j: word[:j] + word[j] + word[j:]),
        st.tuples(i, st.characters()).map(lambda t: word[:t[0]] + t[1] + word[t[0] + 1:]),
        st.just(word.upper()),
    )


def _out_of_range(v: Any) -> st.SearchStrategy:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return JUNK
    candidates = [0, -1, 2**64, -(2**64), 1e308 * 10, 10**400]
    for make in (lambda: -v, lambda: v - 10**6, lambda: v * 10**9, lambda: v + 0.5):
        try:
            candidates.append(make())
        except OverflowError:  # v is already an integer beyond any float
            pass
    return st.sampled_from(candidates)


@st.composite
def mutate(draw, data: dict) -> tuple[dict, list[str]]:
    """`data` broken in 1-3 places; returns the broken copy and what was done (for the failure report)."""
    import copy

    data, done = copy.deepcopy(data), []
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["add_key", "replace", "kind", "delete", "range", "typo_key", "swap"]))
        places = _places(data)
        if op == "add_key":
            where = draw(st.sampled_from(_tables(data)))
            key = draw(st.one_of(st.text(max_size=12), NAME))
            _at(data, where)[key] = draw(JUNK)
            done.append(f"add {where}+{key!r}")
            continue
        if not places:
            continue
        where, key = draw(st.sampled_from(places))
        parent = _at(data, where)
        if op == "replace":
            parent[key] = draw(JUNK)
        elif op == "kind":
            kinds = [(w, k) for w, k in places if k == "kind"] or [(where, key)]
            where, key = draw(st.sampled_from(kinds))
            parent = _at(data, where)
            old = parent[key]
            parent[key] = draw(_near_miss(old) if isinstance(old, str) else st.text(max_size=8))
        elif op == "delete":
            del parent[key]
        elif op == "range":
            parent[key] = draw(_out_of_range(parent[key]))
        elif op == "typo_key" and isinstance(parent, dict):
            parent[draw(_near_miss(str(key)))] = parent.pop(key)
        elif op == "swap":
            other_where, other_key = draw(st.sampled_from(places))
            parent[key] = copy.deepcopy(_at(data, other_where)[other_key])
        done.append(f"{op} {where}.{key}")
    return data, done
