"""Evaluation records: the folder `zoo eval NAME_OR_DIR ... --save DIR` writes, so that a model which is not a
run folder (a catalogue model, a checkpoint, any of them with `--set` overrides: a training-free sparsification)
has a row in `zoo compare` beside the runs.

`DIR/evaluation.json` holds what was loaded — `model` (as given), `checkpoint` (the folder), `sha256` (of its
weights), `overrides`, `recipe` (after the overrides) — and `accounting`, `date`, `zoo` (version), then what was
measured: `val_loss`, `val_ppl`, `tokens`, `sparsity`, `expert_load` (on the recipe's validation split, or on
the files in `data`), `heldout`,
`tasks` ({task: {metric: value}}, lm-eval) with `task_limits` ({task: --limit}), and `decode` (ms per token
at batch 1, with the threads; `zoo.eval.perplexity.decode_ms`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from zoo.errors import ZooError
from zoo.files import atomic_folder, write_atomic
from zoo.runs import EVALUATION, RECIPE, read_meta, resolve_checkpoint

FORMAT = 1  # of evaluation.json


def is_record(path: str | Path) -> bool:
    return (Path(path) / EVALUATION).is_file()


def read_record(path: str | Path) -> dict[str, Any]:
    """evaluation.json of record folder `path`, checked enough to be used."""
    file = Path(path) / EVALUATION
    try:
        record = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ZooError(f"{file}: corrupt JSON ({err})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        found = record.get("format") if isinstance(record, dict) else None
        raise ZooError(f"{file}: evaluation record format {found!r}, this zoo reads {FORMAT}")
    missing = [k for k in ("model", "checkpoint", "sha256", "overrides", "recipe", "accounting") if k not in record]
    if missing:
        raise ZooError(f"{file}: missing {', '.join(missing)} (not written by zoo eval --save)")
    return record


def record_checkpoint(record: dict[str, Any], path: str | Path) -> Path:
    """The checkpoint folder the record at `path` evaluated; it must still hold the same weights."""
    ckpt = Path(record["checkpoint"])
    if not ckpt.is_dir():
        raise ZooError(f"{Path(path) / EVALUATION}: the checkpoint it evaluated, {ckpt}, is gone")
    if read_meta(ckpt)["sha256"] != record["sha256"]:
        raise ZooError(f"{Path(path) / EVALUATION}: {ckpt} now holds other weights than the ones it evaluated "
                       f"(sha256 {record['sha256'][:12]}…)")
    return ckpt


def check_target(path: str | Path) -> Path:
    """`--save DIR`, refused before anything is evaluated: it must be new, empty or a record (then replaced),
    inside a folder this process can write."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ZooError(f"--save {path}: is a file, not a folder")
    if path.is_dir() and not is_record(path) and any(path.iterdir()):
        what = "a run folder" if (path / RECIPE).is_file() else "a folder that is not an evaluation record"
        raise ZooError(f"--save {path}: {what} (and not empty); give a new folder or an earlier record to replace")
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ZooError(f"--save {path}: cannot write in {parent}")
    return path


def new_record(model_arg: str, ckpt: Path, overrides: list[str], recipe: dict, accounting: dict,
               measured: dict[str, Any], when: str, version: str) -> dict[str, Any]:
    return {"format": FORMAT, "model": model_arg, "checkpoint": str(Path(ckpt).absolute()),
            "sha256": read_meta(ckpt)["sha256"], "overrides": list(overrides), "recipe": recipe,
            "accounting": accounting, "date": when, "zoo": version, **measured}


def save_record(path: str | Path, record: dict[str, Any]) -> Path:
    """Write the record folder `path` whole (replacing a record there) or not at all."""
    with atomic_folder(path) as tmp:
        write_atomic(tmp / EVALUATION, json.dumps(record, indent=2) + "\n")
    return Path(path)


def merge_into(path: str | Path, measured: dict[str, Any]) -> dict[str, Any]:
    """Add what `zoo eval RECORD` measured to the record at `path`: tasks (and their limits) merged by task,
    any other section replaced."""
    record = read_record(path)
    if "val_loss" in measured:  # a validation on other data replaces the last one, whatever its data
        record.pop("data", None)
    for key, value in measured.items():
        record[key] = {**record.get(key, {}), **value} if key in ("tasks", "task_limits") else value
    write_atomic(Path(path) / EVALUATION, json.dumps(record, indent=2) + "\n")
    return record


def resolve(arg: str, overrides: list[str]) -> tuple[Path, list[str], bool]:
    """What `zoo eval ARG --set ...` loads: (checkpoint folder, overrides, whether ARG is a record). A record
    loads the checkpoint it evaluated with its overrides, then these."""
    if is_record(arg):
        record = read_record(arg)
        return record_checkpoint(record, arg), [*record["overrides"], *overrides], True
    return resolve_checkpoint(arg), list(overrides), False
