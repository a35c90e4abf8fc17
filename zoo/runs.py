"""What is on disk: the run folder that `zoo train` writes and `zoo eval`, `zoo compare`, `zoo export` and
the sweeps read, and the names and meta.json of the checkpoint folders inside it.

    recipe.toml          the resolved recipe
    metrics.jsonl        one JSON object per logged step and per validation
    checkpoints/step-N/  checkpoint folders (model.safetensors, recipe.toml, meta.json: written and read by
                         zoo.io.checkpoint) plus training state (zoo.train.state)
    summary.json         written when the run finished
    tasks.json           lm-eval scores, written by `zoo eval RUN --tasks ...` (read by `zoo compare`)
    decode.json          decode ms/token at batch 1, written by `zoo eval RUN --decode` (read by `zoo compare`)

and the evaluation record `zoo eval ... --save DIR` writes: DIR/evaluation.json (zoo.eval.record).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from zoo.errors import CheckpointError, ZooError, did_you_mean
from zoo.recipe.loader import catalogue_checkpoint, catalogue_names

METRICS, SUMMARY, CHECKPOINTS, TASKS = "metrics.jsonl", "summary.json", "checkpoints", "tasks.json"
DECODE, EVALUATION = "decode.json", "evaluation.json"
RECIPE, WEIGHTS, META = "recipe.toml", "model.safetensors", "meta.json"  # RECIPE: in run and checkpoint folders
FORMAT = 1  # of meta.json
_STEP_DIR = re.compile(r"step-(\d+)$")


def prepare_out(out: str | Path) -> Path:
    """Create the run folder and check that it is writable."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ZooError(f"--out {out}: cannot write there ({err.strerror or err})") from None
    return out


def read_meta(path: str | Path) -> dict[str, Any]:
    """The checkpoint's meta.json, after checking the folder has all three files."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder")
    for name in (META, RECIPE, WEIGHTS):
        if not (path / name).is_file():
            raise CheckpointError(f"{path}: missing {name} (not a zoo checkpoint, or an incomplete one)")
    try:
        meta = json.loads((path / META).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path / META}: corrupt JSON ({err})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("sha256"), str):
        raise CheckpointError(f"{path / META}: missing the 'sha256' of {WEIGHTS}")
    aliases, transforms = meta.get("aliases", {}), meta.get("transforms", [])
    if not (isinstance(aliases, dict) and all(isinstance(v, str) for v in aliases.values())):
        raise CheckpointError(f"{path / META}: 'aliases' must map tensor names to tensor names")
    if not (isinstance(transforms, list) and all(isinstance(t, str) for t in transforms)):
        raise CheckpointError(f"{path / META}: 'transforms' must be a list of method names")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path / META}: checkpoint format {meta.get('format')!r}, this zoo reads {FORMAT}")
    return meta


def step_dirs(run_dir: Path) -> list[Path]:
    """The run's checkpoint folders, oldest first."""
    folder = Path(run_dir) / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / META).is_file()]
    return [p for _, p in sorted(found)]


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, a run folder (its newest checkpoint) or a pretrained catalogue model's name (its
    imported checkpoint); `checkpoints/step-20` also names `checkpoints/step-00000020`."""
    folder = catalogue_checkpoint(path)
    if folder is not None:
        return folder
    path = Path(path)
    step = _STEP_DIR.match(path.name)
    if step and not path.exists():
        path = path.with_name(f"step-{int(step.group(1)):08d}")
        if not (path / META).is_file():
            have = ", ".join(str(int(p.name[5:])) for p in step_dirs(path.parent.parent)) or "none"
            raise CheckpointError(f"{path.parent}: no checkpoint step-{int(step.group(1))} (steps there: {have})")
    if (path / META).is_file() or (path / WEIGHTS).is_file():  # a checkpoint (maybe an incomplete one)
        read_meta(path)
        return path
    found = step_dirs(path)
    if found:
        return found[-1]
    if not path.exists():
        hint = "" if os.sep in str(path) else did_you_mean(str(path), catalogue_names())
        raise CheckpointError(f"{path}: no such checkpoint or run folder" +
                              (f", nor a model in the catalogue{hint}; `zoo models` lists them" if hint else ""))
    raise CheckpointError(f"{path}: neither a zoo checkpoint (no {META}) nor a run folder with {CHECKPOINTS}/step-N")
