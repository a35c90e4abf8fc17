"""Corrupt checkpoints: every damage gives a one-line CheckpointError (never a partial model, never pickle).

Each case damages a fresh copy of a saved tiny checkpoint. "fixed hash" variants also rewrite the
sha256 in meta.json, so the damage gets past the hash check and reaches the deeper checks
(safetensors header, tensor names, shapes, dtypes, the recipe).
"""

from __future__ import annotations

import ast
import hashlib
import json
import pickle
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import zoo
from tests.conftest import ROOT, tiny
from zoo.io.checkpoint import META, RECIPE, WEIGHTS


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return zoo.save(zoo.build(tiny()), tmp_path_factory.mktemp("ckpt") / "good")


def fix_hash(ckpt: Path) -> None:
    """Make meta.json's sha256 agree with the (damaged) weights, as a careless tool would."""
    meta = json.loads((ckpt / META).read_text())
    meta["sha256"] = hashlib.sha256((ckpt / WEIGHTS).read_bytes()).hexdigest()
    (ckpt / META).write_text(json.dumps(meta))


def edit_meta(**changes) -> Callable[[Path], None]:
    def edit(ckpt: Path) -> None:
        meta = json.loads((ckpt / META).read_text())
        meta.update(changes)
        (ckpt / META).write_text(json.dumps(meta))
    return edit


def edit_tensors(change: Callable[[dict], None]) -> Callable[[Path], None]:
    """Rewrite model.safetensors with `change` applied to its tensors, hash fixed."""
    def edit(ckpt: Path) -> None:
        tensors = load_file(ckpt / WEIGHTS)
        change(tensors)
        save_file(tensors, ckpt / WEIGHTS)
        fix_hash(ckpt)
    return edit


def truncate(n: int | float, fixed: bool) -> Callable[[Path], None]:
    def edit(ckpt: Path) -> None:
        data = (ckpt / WEIGHTS).read_bytes()
        (ckpt / WEIGHTS).write_bytes(data[: int(n * len(data)) if isinstance(n, float) else n])
        if fixed:
            fix_hash(ckpt)
    return edit


def write(name: str, content: bytes | str) -> Callable[[Path], None]:
    def edit(ckpt: Path) -> None:
        path = ckpt / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return edit


def remove(name: str) -> Callable[[Path], None]:
    def edit(ckpt: Path) -> None:
        (ckpt / name).unlink()
    return edit


def replace_with_folder(name: str) -> Callable[[Path], None]:
    def edit(ckpt: Path) -> None:
        (ckpt / name).unlink()
        (ckpt / name).mkdir()
    return edit


def other_recipe(*overrides: str) -> Callable[[Path], None]:
    def edit(ckpt: Path) -> None:
        (ckpt / RECIPE).write_text(tiny(*overrides).to_toml())
    return edit


def header_lies(ckpt: Path) -> None:
    """A safetensors header whose offsets point past the end of the data."""
    header = json.dumps({"embed.weight": {"dtype": "F32", "shape": [256, 48], "data_offsets": [0, 10**9]}}).encode()
    (ckpt / WEIGHTS).write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 64)
    fix_hash(ckpt)


class Bomb:
    """Unpickling this creates a file: the proof that something unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def pickle_instead(ckpt: Path) -> None:
    (ckpt / WEIGHTS).write_bytes(pickle.dumps({"embed.weight": Bomb(ckpt.parent / f"{ckpt.name}.UNPICKLED")}))
    fix_hash(ckpt)


def drop_first(tensors: dict) -> None:
    tensors.pop(sorted(tensors)[0])


def add_extra(tensors: dict) -> None:
    tensors["extra.weight"] = torch.zeros(3)


def reshape_one(tensors: dict) -> None:
    name = "norm.weight"
    tensors[name] = torch.cat([tensors[name], tensors[name][:1]])


def cast_one(tensors: dict) -> None:
    tensors["norm.weight"] = tensors["norm.weight"].half()


def rename_one(tensors: dict) -> None:
    tensors["norm.weights"] = tensors.pop("norm.weight")


CASES: dict[str, Callable[[Path], None]] = {
    **{f"truncated to {n}": truncate(n, False) for n in (0, 1, 7, 8, 100, 0.5, 0.999)},
    **{f"truncated to {n}, fixed hash": truncate(n, True) for n in (0, 1, 7, 8, 9, 100, 0.5, 0.999)},
    **{f"missing {name}": remove(name) for name in (META, RECIPE, WEIGHTS)},
    **{f"empty {name}": write(name, b"") for name in (META, RECIPE, WEIGHTS)},
    **{f"{name} is a folder": replace_with_folder(name) for name in (META, RECIPE, WEIGHTS)},
    "meta.json not JSON": write(META, "{not json"),
    "meta.json binary": write(META, b"\xff\xfe\x00"),
    "meta.json a list": write(META, "[1, 2]"),
    "meta.json without sha256": edit_meta(sha256=None),
    "meta.json sha256 a number": edit_meta(sha256=5),
    "meta.json other format": edit_meta(format=2),
    "meta.json aliases not a table": edit_meta(aliases=[1]),
    "alias to a missing tensor": edit_meta(aliases={"head.weight": "nope"}),
    "alias to another shape": edit_meta(aliases={"head.weight": "norm.weight"}),
    "alias of an unknown name": edit_meta(aliases={"nope": "embed.weight"}),
    "transform not replayable": edit_meta(transforms=["__init__"]),
    "transform a dangerous method": edit_meta(transforms=["cuda"]),
    "transforms not a list": edit_meta(transforms="freeze"),
    "recipe of another width": other_recipe("model.d_model=64"),
    "recipe of another depth": other_recipe("model.n_layers=3"),
    "recipe of another vocabulary": other_recipe("model.vocab_size=300"),
    "recipe in bfloat16": other_recipe("model.dtype='bfloat16'"),
    "recipe of a huge model": write(RECIPE, "[model]\nd_model = 65536\nn_layers = 1024\nvocab_size = 4000000\n"),
    "recipe malformed": write(RECIPE, "[model\n"),
    "recipe binary": write(RECIPE, b"\x00\xff"),
    "recipe unknown kind": write(RECIPE, '[model.ffn]\nkind = "nope"\n'),
    "recipe extends a missing file": write(RECIPE, 'extends = "nowhere.toml"\n'),
    "tensor missing": edit_tensors(drop_first),
    "tensor extra": edit_tensors(add_extra),
    "tensor of another shape": edit_tensors(reshape_one),
    "tensor of another dtype": edit_tensors(cast_one),
    "tensor renamed": edit_tensors(rename_one),
    "safetensors header lies": header_lies,
    "a pickle instead of safetensors": pickle_instead,
}


def damaged(original: Path, tmp: Path, edit: Callable[[Path], None]) -> Path:
    ckpt = tmp / "ckpt"
    shutil.copytree(original, ckpt)
    edit(ckpt)
    return ckpt


def assert_refused(ckpt: Path) -> None:
    """zoo.load raises a one-line CheckpointError naming the folder; the folder is left as it was."""
    before = {p.name: (p.read_bytes() if p.is_file() else None) for p in ckpt.iterdir()}
    with pytest.raises(zoo.CheckpointError) as info:
        zoo.load(ckpt)
    msg = str(info.value)
    assert str(ckpt) in msg and "\n" not in msg, msg
    assert {p.name: (p.read_bytes() if p.is_file() else None) for p in ckpt.iterdir()} == before


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c == "recipe of a huge model" else c
                                  for c in sorted(CASES)])  # the huge one builds 1024 layers on the meta device
def test_damaged_checkpoint_is_refused(original, tmp_path, case):
    assert_refused(damaged(original, tmp_path, CASES[case]))
    assert not list(tmp_path.glob("*.UNPICKLED")), "loading unpickled the weights file"


def test_original_loads(original):
    model = zoo.load(original)
    stored = load_file(original / WEIGHTS)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in stored.items())


@pytest.mark.slow  # 150 examples
@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(data=st.data())
def test_flipped_bytes(original, tmp_path_factory, data):
    """Bytes flipped anywhere: refused by the hash; with the hash fixed, refused or loaded intact."""
    tmp = tmp_path_factory.mktemp("flip")
    fixed = data.draw(st.booleans(), label="fix hash")
    size = (original / WEIGHTS).stat().st_size
    header = 8 + struct.unpack("<Q", (original / WEIGHTS).read_bytes()[:8])[0]
    where = st.integers(0, header - 1) if data.draw(st.booleans(), label="in header") else st.integers(0, size - 1)
    flips = data.draw(st.lists(st.tuples(where, st.integers(1, 255)), min_size=1, max_size=4, unique_by=lambda f: f[0]),
                      label="flips")

    def flip(ckpt: Path) -> None:
        raw = bytearray((ckpt / WEIGHTS).read_bytes())
        for i, x in flips:
            raw[i] ^= x
        (ckpt / WEIGHTS).write_bytes(bytes(raw))
        if fixed:
            fix_hash(ckpt)

    ckpt = damaged(original, tmp, flip)
    if not fixed:
        return assert_refused(ckpt)
    try:
        model = zoo.load(ckpt)
    except zoo.CheckpointError as err:
        assert "\n" not in str(err)
        return
    stored = load_file(ckpt / WEIGHTS)  # loaded: then it holds exactly what the file says, all of it
    state = model.state_dict()
    assert set(stored) <= set(state)
    assert all(torch.equal(state[k], v) for k, v in stored.items())


def _unsafe_loads(tree: ast.AST) -> list[str]:
    """Calls that could unpickle: torch.load without weights_only=True, pickle/dill loads, np.load pickles."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        kw = {k.arg: k.value for k in node.keywords}
        if name.endswith(("torch.load", "serialization.load")):
            ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
            if not ok:
                found.append(f"{name}(...) without weights_only=True at line {node.lineno}")
        elif name.split(".")[0] in ("pickle", "dill", "cloudpickle", "joblib") and "load" in name:
            found.append(f"{name}(...) at line {node.lineno}")
        elif name.endswith("np.load") or name.endswith("numpy.load"):
            allow = kw.get("allow_pickle")
            if isinstance(allow, ast.Constant) and allow.value:
                found.append(f"{name}(allow_pickle=True) at line {node.lineno}")
    return found


def test_nothing_in_zoo_unpickles():
    """Loading never unpickles: every torch.load passes weights_only=True; no pickle loads at all."""
    problems = []
    for folder in ("zoo", "plugins"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            problems += [f"{path.relative_to(ROOT)}: {p}" for p in _unsafe_loads(ast.parse(path.read_text()))]
    assert not problems, "\n".join(problems)


def test_unsafe_load_detector_works():
    code = "import torch, pickle\ntorch.load(f)\ntorch.load(f, weights_only=False)\npickle.loads(b)\n" \
           "torch.load(f, weights_only=True)\n"
    assert len(_unsafe_loads(ast.parse(code))) == 3
