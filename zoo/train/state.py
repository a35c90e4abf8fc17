"""Everything a resumed run needs, in one place: `TrainState` plus the checkpoints of a run folder.

A training checkpoint is a zoo checkpoint folder (`zoo.save`: model.safetensors, recipe.toml,
meta.json, written atomically) with three more files: `train_state.safetensors` (optimizer
moments and RNG states), `train_state.json` (step, data position, optimizer hyper-parameters)
and, for trained or user tokenizers, `tokenizer.json`. No pickle anywhere.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from zoo.errors import CheckpointError
from zoo.io.checkpoint import save
from zoo.runs import CHECKPOINTS, step_dirs

STATE_TENSORS, STATE_JSON = "train_state.safetensors", "train_state.json"


@dataclass
class TrainState:
    """Counters of a run. `samples` is the data position: Windows sample g is a function of (seed, g)."""

    step: int = 0
    samples: int = 0
    tokens: int = 0
    elapsed: float = 0.0


def _optimizer_tensors(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{pid}.{k}"] = v.detach().contiguous().cpu()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _restore_optimizer(load: Callable[[dict], None], tensors: dict[str, torch.Tensor], info: dict) -> None:
    state: dict[int, dict] = {}
    for name, t in tensors.items():
        if name.startswith("optim."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = t
    for name, v in info["scalars"].items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = v
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in info["param_groups"]]
    load({"state": state, "param_groups": groups})


def save_checkpoint(run_dir: Path, model, optim_state: dict, state: TrainState, tokenizer_json: str | None,
                    keep_last: int, weights: dict[str, torch.Tensor] | None = None) -> Path:
    """Write checkpoint `step-N` of the run atomically, then drop all but the newest `keep_last`.

    `optim_state` is opt.state_dict() (of one process); `weights` replaces model.state_dict() (the
    gathered tensors of a sharded model).
    """
    tensors, info = _optimizer_tensors(optim_state)
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    files: dict[str, str | bytes] = {
        STATE_TENSORS: st_save(tensors),
        STATE_JSON: json.dumps({"state": dataclasses.asdict(state), "optimizer": info}, indent=1) + "\n",
    }
    if tokenizer_json is not None:
        files["tokenizer.json"] = tokenizer_json
    path = save(model, Path(run_dir) / CHECKPOINTS / f"step-{state.step:08d}", files=files,
                meta={"step": state.step, "tokens": state.tokens}, weights=weights)
    for old in step_dirs(run_dir)[:-keep_last]:  # renamed first: a half-deleted folder never looks like one
        trash = old.with_name(f".{old.name}.old-deleting")
        os.replace(old, trash)
        shutil.rmtree(trash, ignore_errors=True)
    for stale in path.parent.glob(".step-*"):  # left by a process killed while writing or deleting
        shutil.rmtree(stale, ignore_errors=True)
    return path


def load_train_state(ckpt: Path, load_optimizer: Callable[[dict], None]) -> TrainState:
    """Restore optimizer (through `load_optimizer`, e.g. opt.load_state_dict) and RNG state; return the counters."""
    try:
        info = json.loads((ckpt / STATE_JSON).read_text(encoding="utf-8"))
        tensors = st_load((ckpt / STATE_TENSORS).read_bytes())
    except (OSError, ValueError, SafetensorError) as err:
        raise CheckpointError(f"{ckpt}: no readable training state, cannot resume from it ({err})") from None
    try:
        _restore_optimizer(load_optimizer, tensors, info["optimizer"])
    except (ValueError, KeyError) as err:
        raise CheckpointError(f"{ckpt}: its optimizer state does not fit this model ({err})") from None
    torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    return TrainState(**info["state"])
