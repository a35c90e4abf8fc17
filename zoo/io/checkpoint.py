"""Checkpoints: a folder with model.safetensors, recipe.toml and meta.json. Never pickle.

`save` writes into a temporary sibling folder, fsyncs, then renames it into place, so a
reader sees either the old checkpoint or the new one, never half of one. `load` rebuilds the
model from recipe.toml and checks every tensor name, shape, dtype and the file hash.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from zoo._version import __version__
from zoo.errors import CheckpointError, ZooError
from zoo.files import atomic_folder
from zoo.model.build import build
from zoo.recipe.recipe import load_recipe
from zoo.runs import FORMAT, META, RECIPE, WEIGHTS, read_meta, resolve_checkpoint
from zoo.schema import recipe_changes


def sha256(path: Path) -> str:
    """Hex digest of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _unique_tensors(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A state_dict without tied duplicates, plus {alias: stored name} for the ties."""
    tensors, aliases, by_storage = {}, {}, {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and key in by_storage:
            aliases[name] = by_storage[key]
            continue
        by_storage[key] = name
        tensors[name] = t.detach().contiguous().cpu()
    return tensors, aliases


def save(model: nn.Module, path: str | Path, *, meta: dict[str, Any] | None = None,
         files: dict[str, str | bytes] | None = None, weights: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `model` (built by zoo.build) to folder `path`, atomically replacing what was there.

    `weights` (default model.state_dict()) are the tensors to write, e.g. gathered from FSDP shards.
    """
    path = Path(path)
    recipe = getattr(model, "recipe", None)
    if recipe is None:
        raise CheckpointError("zoo.save needs a model built by zoo.build (it has no .recipe)")
    weights = model.state_dict() if weights is None else weights
    if any(t.is_meta for t in weights.values()):
        raise CheckpointError("zoo.save: the model is on the meta device (built for accounting); it has no weights")
    if path.exists() and not (path.is_dir() and ((path / META).is_file() or not any(path.iterdir()))):
        raise CheckpointError(f"{path} exists and is not a zoo checkpoint folder; refusing to replace it")
    try:
        with atomic_folder(path) as tmp:
            tensors, aliases = _unique_tensors(weights)
            save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
            (tmp / RECIPE).write_text(recipe.to_toml(), encoding="utf-8")
            for name, content in (files or {}).items():
                mode = "wb" if isinstance(content, bytes) else "w"
                with open(tmp / name, mode) as f:
                    f.write(content)

            info = {
                "format": FORMAT,
                "zoo_version": __version__,
                "parameters": sum((weights[n] if n in weights else p).numel() for n, p in model.named_parameters()),
                "sha256": sha256(tmp / WEIGHTS),
                "recipe_sha256": sha256(tmp / RECIPE),  # with "recipe": what load compares an edited recipe.toml to
                "recipe": recipe.to_dict(),
                "aliases": aliases,
                "transforms": list(getattr(model, "zoo_transforms", [])),
                **(meta or {}),
            }
            (tmp / META).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    except OSError as err:
        raise CheckpointError(f"cannot write checkpoint {path}: {err.strerror or err}") from None
    return path


def _check_size(path: Path, skeleton: nn.Module) -> None:
    """Refuse a recipe whose model is far larger than the weights file, before allocating it.

    `skeleton` is the model on the meta device. Packed inference weights (e.g. 2-bit ternary) can
    be up to 16x smaller than the model as built, hence the generous bound; the exact tensor-by-
    tensor check follows after building.
    """
    need = sum(t.numel() * t.element_size() for t in [*skeleton.parameters(), *skeleton.buffers()])
    have = (path / WEIGHTS).stat().st_size
    if need > 32 * have + (64 << 20):
        raise CheckpointError(f"{path / RECIPE}: describes a model of {need:,} bytes, but {WEIGHTS} holds "
                              f"{have:,} bytes: the recipe does not belong to these weights")


def _warn_if_recipe_changed(path: Path, meta: dict[str, Any], recipe) -> None:
    """One warning line naming the keys in which recipe.toml differs from the recipe the weights were saved
    with: an edit is allowed (it is how a checkpoint is continued differently), a silent change is not."""
    if meta.get("recipe_sha256") in (None, sha256(path / RECIPE)):
        return
    saved = meta.get("recipe")
    if isinstance(saved, dict):
        changes = recipe_changes(saved, json.loads(json.dumps(recipe.to_dict())))
        if not changes:  # reformatted, comments: the same recipe
            return
        what = "; ".join(changes[:8]) + (f"; and {len(changes) - 8} more" if len(changes) > 8 else "")
    else:
        what = "its saved copy is not in meta.json"
    warnings.warn(f"{path / RECIPE} differs from the recipe the weights were saved with ({what}); "
                  "loading it as it is now", stacklevel=3)


def load(path: str | Path, device: str | torch.device = "cpu", registry=None,
         overrides: list[str] | dict[str, Any] | None = None) -> nn.Module:
    """Rebuild the model saved in folder `path` (the newest checkpoint of run folder `path`, or catalogue model
    `path`); any mismatch of the weights raises CheckpointError, a recipe.toml edited since saving is loaded
    with a warning. `overrides` (`a.b=value`, as `--set`) change its recipe first, e.g. a training-free
    sparsity; the tensors must still match."""
    path = resolve_checkpoint(path)
    meta = read_meta(path)
    digest = sha256(path / WEIGHTS)
    if digest != meta["sha256"]:
        raise CheckpointError(f"{path / WEIGHTS}: sha256 {digest[:12]}… does not match meta.json "
                              f"({meta['sha256'][:12]}…): the file is corrupt or was changed")
    try:
        recipe = load_recipe(path / RECIPE, overrides)
        _check_size(path, build(recipe, device="meta", registry=registry))
        model = build(recipe, device=device, registry=registry)
    except CheckpointError:
        raise
    except ZooError as err:
        raise CheckpointError(f"{path}: its recipe cannot be built here: {err}") from None
    _warn_if_recipe_changed(path, meta, recipe)
    allowed = getattr(model, "TRANSFORMS", ())
    for transform in meta.get("transforms", []):
        if transform not in allowed:
            raise CheckpointError(f"{path / META}: transform {transform!r} is not one this zoo replays "
                                  f"({', '.join(allowed) or 'none'})")
        getattr(model, transform)()
    expected = model.state_dict()
    aliases = meta.get("aliases", {})
    try:
        with safe_open(str(path / WEIGHTS), framework="pt", device=str(device)) as f:
            stored = set(f.keys())
            missing = sorted(set(expected) - stored - set(aliases))
            unexpected = sorted(stored - set(expected))
            if missing or unexpected:
                what = f"missing tensor {missing[0]!r}" if missing else f"unexpected tensor {unexpected[0]!r}"
                more = len(missing) + len(unexpected) - 1
                raise CheckpointError(f"{path / WEIGHTS}: {what}" + (f" (and {more} more)" if more else "")
                                      + " for its recipe")
            state = {}
            for name in sorted(stored):
                t = f.get_tensor(name)
                want = expected[name]
                if tuple(t.shape) != tuple(want.shape) or t.dtype != want.dtype:
                    raise CheckpointError(
                        f"{path / WEIGHTS}: tensor {name!r} is {t.dtype} {tuple(t.shape)}, "
                        f"its recipe needs {want.dtype} {tuple(want.shape)}")
                state[name] = t
    except SafetensorError as err:
        raise CheckpointError(f"{path / WEIGHTS}: unreadable safetensors file ({err})") from None
    for alias, name in aliases.items():
        target = state.get(name)
        want = expected.get(alias)
        if target is None or want is None or target.shape != want.shape or target.dtype != want.dtype:
            raise CheckpointError(f"{path / META}: alias {alias!r} -> {name!r} does not name two tensors "
                                  "of the same shape and dtype in its recipe")
        state.setdefault(alias, target)
    model.load_state_dict(state, strict=True)
    model.recipe = recipe
    return model
