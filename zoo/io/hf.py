"""Hugging Face model folders <-> zoo checkpoints: the generic reading and writing.

What is specific to an architecture (a transformers `model_type`) is its converter, registered
in the `converter` slot (`zoo.io.arch`): `recipe(cfg)` turns config.json into a zoo `[model]`
table, `rules(cfg)` says which HF tensors make each zoo tensor (concatenated along the output
dimension, e.g. q, k, v -> qkv), and, for the layouts zoo can write back, `config(model_cfg)`
turns a zoo model into a config.json. This module reads config.json and the safetensors
shards, gathers (import) and scatters (export) tensors by the rules, and drives both
directions; import and export use the same rules, so they are inverses by construction.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from zoo.errors import CheckpointError, ZooError, did_you_mean, one_of
from zoo.files import atomic_folder
from zoo.io.checkpoint import load, save
from zoo.io.ternary import ternary_view
from zoo.model.build import build
from zoo.recipe.recipe import recipe_from_dict
from zoo.registry import Entry, get_registry
from zoo.runs import resolve_checkpoint

SLOT = "converter"  # the registry slot of architecture converters (zoo.io.arch)
CONFIG, WEIGHTS, INDEX, TOKENIZER = "config.json", "model.safetensors", "model.safetensors.index.json", "tokenizer.json"

# Keys read by the shared code, or that only matter for training, generation defaults or bookkeeping.
GENERIC_KEYS = {
    "architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "_name_or_path",
    "initializer_range", "use_cache", "attention_dropout", "bos_token_id", "eos_token_id", "pad_token_id",
    "output_router_logits", "router_aux_loss_coef", "router_jitter_noise", "pretraining_tp", "tie_word_embeddings",
    "max_window_layers", "use_sliding_window", "sliding_window", "layer_types", "rope_parameters", "rope_scaling",
    "rope_theta", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
    "attention_bias", "mlp_bias", "qkv_bias", "auto_map", "embd_pdrop", "resid_pdrop", "generation_config",
    "output_attentions", "output_hidden_states", "return_dict", "id2label", "label2id", "problem_type",
    "zoo_trained_sparse",
}


class HFConfig:
    """config.json of a Hugging Face model folder; errors name the file and the key."""

    def __init__(self, data: dict[str, Any], file: str):
        self.data, self.file = data, file

    @classmethod
    def read(cls, folder: Path) -> HFConfig:
        path = folder / CONFIG
        if not folder.is_dir():
            raise CheckpointError(f"{folder}: no such folder (expected a Hugging Face model folder)")
        if not path.is_file():
            raise CheckpointError(f"{folder}: missing {CONFIG} (not a Hugging Face model folder)")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{path}: corrupt JSON ({err})") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"{path}: expected a JSON object")
        return cls(data, str(path))

    def error(self, key: str, message: str) -> CheckpointError:
        return CheckpointError(f"{self.file}: {key}: {message}")

    def get(self, key: str, default: Any = None) -> Any:
        v = self.data.get(key)
        return default if v is None else v

    def need(self, key: str) -> Any:
        if self.data.get(key) is None:
            raise self.error(key, "required key is missing")
        return self.data[key]

    def refuse(self, key: str, allowed: Callable[[Any], bool], why: str) -> None:
        """Raise unless `key` is absent or its value passes `allowed`: a model zoo cannot reproduce."""
        v = self.data.get(key)
        if v is not None and not allowed(v):
            raise self.error(key, f"{v!r} is not supported: {why}")


@dataclass(frozen=True)
class Rule:
    """zoo tensor `zoo` = the HF tensors `parts` (name, rows) concatenated along dim 0.

    With `experts` = E > 0 the part names hold "{e}" and the zoo tensor stacks the E experts
    along a new leading dimension (zoo's MoE keeps one [E, out, in] weight per role).
    """

    zoo: str
    parts: tuple[tuple[str, int], ...]
    experts: int = 0

    def expert_parts(self) -> list[tuple[tuple[str, int], ...]]:
        """The parts of each stacked slice: one list per expert, or a single one."""
        if not self.experts:
            return [self.parts]
        return [tuple((name.format(e=e), rows) for name, rows in self.parts) for e in range(self.experts)]


# -- tensors ---------------------------------------------------------------------------------


class HFTensors:
    """The tensors of a model folder: model.safetensors or the shards named by its index."""

    def __init__(self, folder: Path):
        self.folder = folder
        index = folder / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
                raise CheckpointError(f"{index}: not a safetensors index ({type(err).__name__}: {err})") from None
            self.where = {name: folder / file for name, file in weight_map.items()}
        elif (folder / WEIGHTS).is_file():
            self.where = None
        else:
            legacy = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
            hint = f" (found {legacy[0]}: pickle files are not read; save with safe_serialization)" if legacy else ""
            raise CheckpointError(f"{folder}: missing {WEIGHTS} or {INDEX}{hint}")
        self.files: dict[Path, Any] = {}

    def _open(self, path: Path):
        if path not in self.files:
            if not path.is_file():
                raise CheckpointError(f"{path}: shard named in {INDEX} is missing")
            try:
                self.files[path] = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError) as err:
                raise CheckpointError(f"{path}: unreadable safetensors file ({err})") from None
        return self.files[path]

    def names(self) -> set[str]:
        if self.where is not None:
            return set(self.where)
        return set(self._open(self.folder / WEIGHTS).keys())

    def get(self, name: str) -> torch.Tensor:
        path = self.folder / WEIGHTS if self.where is None else self.where.get(name)
        f = None if path is None else self._open(path)
        if f is None or name not in f.keys():
            raise CheckpointError(f"{path or self.folder / INDEX}: missing tensor {name!r}")
        try:
            return f.get_tensor(name)
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{path}: tensor {name!r} is unreadable ({err})") from None


def gather(rules: list[Rule], source: Callable[[str], torch.Tensor], expected: dict[str, torch.Tensor],
           where: str) -> dict[str, torch.Tensor]:
    """The zoo state dict from HF tensors, checking every part's shape against the config."""
    state = {}
    for rule in rules:
        want = expected.get(rule.zoo)
        if want is None:
            raise ZooError(f"internal: no zoo tensor {rule.zoo!r} for {rule.parts[0][0]!r}")
        inner = tuple(want.shape[2:] if rule.experts else want.shape[1:])
        slices = []
        for parts in rule.expert_parts():
            pieces = []
            for name, rows in parts:
                t = source(name)
                if tuple(t.shape) != (rows, *inner):
                    raise CheckpointError(f"{where}: tensor {name!r} has shape {tuple(t.shape)}, "
                                          f"config.json implies {(rows, *inner)}")
                pieces.append(t.to(want.dtype))
            slices.append(torch.cat(pieces) if len(pieces) > 1 else pieces[0])
        state[rule.zoo] = torch.stack(slices) if rule.experts else slices[0]
    return state


def scatter(rules: list[Rule], state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `gather`: HF tensors from a zoo state dict."""
    out = {}
    for rule in rules:
        t = state[rule.zoo]
        slices = t.unbind(0) if rule.experts else [t]
        for parts, piece in zip(rule.expert_parts(), slices):
            for (name, _), x in zip(parts, piece.split([rows for _, rows in parts])):
                out[name] = x.contiguous().clone()
    return out


# -- converters ------------------------------------------------------------------------------


def converter(cfg: HFConfig) -> tuple[Entry, Any]:
    """(registry entry, converter) for the config's model_type; unknown ones are refused by name."""
    registry = get_registry()
    model_type = cfg.need("model_type")
    kinds = registry.kinds(SLOT)
    if model_type not in kinds:
        raise cfg.error("model_type", f"{model_type!r} is not supported{did_you_mean(model_type, kinds)}; "
                                      f"{one_of(kinds)}")
    entry = registry.get(SLOT, model_type)
    return entry, entry.factory()


# -- import ----------------------------------------------------------------------------------


def hf_recipe(cfg: HFConfig, dtype: str | None = None, max_len: int | None = None, name: str = ""):
    """The zoo Recipe equivalent to a config.json."""
    entry, conv = converter(cfg)
    with entry.blame("reading", cfg.file):
        conv.check_quantization(cfg)
        model = conv.recipe(cfg)
    unknown = sorted(set(cfg.data) - GENERIC_KEYS - conv.known - {"quantization_config"})
    if unknown:
        warnings.warn(f"{cfg.file}: ignoring keys {', '.join(unknown)} (not read by zoo's "
                      f"{cfg.data['model_type']} import)", stacklevel=3)
    if dtype is None:
        stored = cfg.get("dtype", cfg.get("torch_dtype", "float32"))
        dtype = stored if stored in ("float32", "bfloat16", "float16") else "float32"
    model["dtype"] = dtype
    if max_len is not None:
        model["max_seq_len"] = min(model["max_seq_len"], max_len)
    return recipe_from_dict({"name": name, "model": model}, source=cfg.file)


def from_hf(path: str | Path, dtype: str | None = None, max_seq_len: int | None = None):
    """(model, recipe) from a Hugging Face model folder; the model computes the same logits."""
    folder = Path(path)
    cfg = HFConfig.read(folder)
    recipe = hf_recipe(cfg, dtype, max_seq_len, name=folder.name)
    tensors = HFTensors(folder)
    model = build(recipe)
    load_weights(model, cfg, tensors.get, str(folder))
    return model, recipe


def load_weights(model, cfg: HFConfig, get: Callable[[str], torch.Tensor], where: str) -> None:
    """Fill `model` from the HF-named tensors that `get` serves, by the architecture's rules."""
    entry, conv = converter(cfg)
    with entry.blame("loading weights of", where):
        state = conv.load(cfg, model, get, where)
    if model.config.tie_embeddings:
        state["head.weight"] = state["embed.weight"]
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ZooError(f"internal: the {cfg.data['model_type']} rules leave zoo tensor {missing[0]!r} unset")
    model.load_state_dict(state, strict=True)


def tokenizer_files(folder: Path) -> dict[str, bytes]:
    """tokenizer.json (and its config) when the folder has them, to travel with the checkpoint."""
    return {name: (folder / name).read_bytes() for name in (TOKENIZER, "tokenizer_config.json")
            if (folder / name).is_file()}


def convert_hf(src: str | Path, out: str | Path, dtype: str | None = None, max_seq_len: int | None = None) -> Path:
    """Write the zoo checkpoint of a Hugging Face folder (recipe, weights, tokenizer.json)."""
    src = Path(src)
    model, _ = from_hf(src, dtype, max_seq_len)
    cfg = HFConfig.read(src)
    files = tokenizer_files(src)
    return save_converted(model, out, files, {"format": "hf", "path": str(src), "model_type": cfg.data["model_type"]})


def save_converted(model, out: str | Path, files: dict[str, str | bytes], source: dict[str, Any]) -> Path:
    """zoo.save an imported model; with a tokenizer.json its recipe's data.tokenizer points at that file."""
    out = Path(out)
    if TOKENIZER in files:
        spec = {"kind": "file", "path": str(out.resolve() / TOKENIZER)}
        model.recipe = model.recipe.replace(**{"data.tokenizer": spec})
    return save(model, out, meta={"source": source}, files=files)


# -- export ----------------------------------------------------------------------------------


SPARSITY_NAMES = {"topk": "Q-Sparse top-K", "block_topk": "Block Q-Sparse"}


def sparsity_features(m) -> list[tuple[str, str]]:
    """(key path, feature) of each activation-sparsity block in a model: what no exported format computes."""
    def name(kind: str) -> str:
        return f"{kind!r} ({SPARSITY_NAMES.get(kind, 'activation sparsity')})"

    found = []
    if m.sparsity.kind != "none":
        found.append(("model.sparsity.kind", name(m.sparsity.kind)))
    ffns = [("model.ffn", m.ffn)] + [(f"model.layers[{n}].ffn", p.ffn) for n, p in enumerate(m.layers) if p.ffn]
    for key, ffn in ffns:
        inner = getattr(ffn.config, "expert", None)
        for k, spec in ((key, ffn), (key + ".expert", inner)):
            act = getattr(getattr(spec, "config", None), "act_sparsity", None) if spec is not None else None
            if act is not None:
                found.append((k + ".act_sparsity", name(act.kind) + " inside the FFN"))
    for n, p in enumerate(m.layers):
        if p.sparsity is not None and p.sparsity.kind != "none":
            found.append((f"model.layers[{n}].sparsity", name(p.sparsity.kind)))
    return found


def without_sparsity(recipe):
    """The recipe with every activation-sparsity block removed (the same weights, dense)."""
    data = recipe.to_dict()
    model = data["model"]
    model["sparsity"] = {"kind": "none"}
    for table in [model] + model.get("layers", []):
        ffn = table.get("ffn")
        if isinstance(ffn, dict):
            ffn.pop("act_sparsity", None)
            if isinstance(ffn.get("expert"), dict):
                ffn["expert"].pop("act_sparsity", None)
        if table is not model:
            table.pop("sparsity", None)
    return recipe_from_dict(data, source=recipe.source)


def exportable(recipe, exports: frozenset[str] = frozenset(), fmt: str = "Hugging Face") -> None:
    """Refuse, by key path, what the layout cannot express (`exports`: options its converter writes)."""
    m = recipe.model
    checks = [("model.attention.kind", m.attention.kind, "mha"), ("model.position.kind", m.position.kind, "rope"),
              ("model.norm.kind", m.norm.kind, "rmsnorm"), ("model.sparsity.kind", m.sparsity.kind, "none")]
    if "model.weights" not in exports:
        checks.append(("model.weights.kind", m.weights.kind, "fp"))
    for key, value, want in checks:
        if value != want:
            raise CheckpointError(f"{key}: {value!r} cannot be exported to {fmt} (needs {want!r})")
    for spec, key in ((m.weights, "model.weights.roles"), (m.sparsity, "model.sparsity.roles")):
        if spec.roles:
            raise CheckpointError(f"{key}: per-role overrides cannot be exported to {fmt}")
    if m.layers and "model.layers" not in exports:
        raise CheckpointError(f"model.layers: per-layer patterns cannot be exported to {fmt}")
    allowed = {k.rsplit(".", 1)[1] for k in exports if k.startswith("model.attention.")}
    only_defaults(m.attention.config, {"qkv_bias", "o_bias"} | allowed, "model.attention")
    if m.ffn.kind == "glu":
        allowed = {k.rsplit(".", 1)[1] for k in exports if k.startswith("model.ffn.")}
        only_defaults(m.ffn.config, {"hidden", "activation", "bias"} | allowed, "model.ffn")


def only_defaults(config: Any, allowed: set[str], key: str) -> None:
    """Refuse a block option outside `allowed` that is not at its default (e.g. sub-norms, qk_norm)."""
    for f in dataclasses.fields(config):
        if f.name not in allowed and getattr(config, f.name) != f.default:
            raise CheckpointError(f"{key}.{f.name}: cannot be exported to a transformers layout "
                                  f"(only its default {f.default!r})")


def default_arch(recipe) -> str:
    """bitnet for ternary weights; for a MoE FFN olmoe (q/k norms), qwen2_moe (a shared expert) or
    mixtral; else qwen2 for q/k/v-only biases, else llama."""
    m = recipe.model
    a = m.attention.config
    if m.weights.kind == "bitnet158":
        return "bitnet"
    if m.ffn.kind == "moe":
        return "olmoe" if a.qk_norm else "qwen2_moe" if m.ffn.config.shared_experts else "mixtral"
    return "qwen2" if a.qkv_bias and not a.o_bias else "llama"


def writer(arch: str) -> tuple[Entry, Any]:
    """(registry entry, converter) of a model_type zoo can write (`--arch`), refused by name otherwise."""
    registry = get_registry()
    writable = [k for k in registry.kinds(SLOT) if registry.get(SLOT, k).factory().config is not None]
    if arch not in writable:
        raise CheckpointError(f"--arch {arch!r} cannot be written{did_you_mean(arch, writable)}; {one_of(writable)}")
    entry = registry.get(SLOT, arch)
    return entry, entry.factory()


@dataclass
class HFView:
    """A zoo model as transformers sees it: config.json, full-precision tensors by transformers name
    (ternary projections as W̃·β), and the activation-sparsity features dropped on the way."""

    entry: Entry
    converter: Any
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    dropped: list[tuple[str, str]]


def hf_view(model, arch: str | None = None, drop_sparsity: bool = False, fmt: str = "Hugging Face") -> HFView:
    """The transformers form of a zoo model, or one CheckpointError naming what `fmt` cannot express."""
    recipe = model.recipe
    dropped = sparsity_features(recipe.model)
    if dropped and not drop_sparsity:
        key, feature = dropped[0]
        raise CheckpointError(f"{key}: {feature} cannot be expressed in {fmt} (no format computes activation "
                              "sparsity); pass --drop-sparsity to export the dense weights (recorded in the metadata)")
    if dropped:
        recipe = without_sparsity(recipe)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if recipe.model.weights.kind == "bitnet158":
        recipe, state = ternary_view(model, recipe)
    entry, conv = writer(arch or default_arch(recipe))
    exportable(recipe, conv.exports, fmt)
    with entry.blame("writing", fmt):
        config = conv.config(recipe.model)
        rules = conv.rules(HFConfig(config, "<export>"))
    return HFView(entry, conv, config, scatter(rules, state), dropped)


def export_hf(zoo_dir: str | Path, out: str | Path, arch: str | None = None, drop_sparsity: bool = False,
              force: bool = False) -> Path:
    """Write a Hugging Face folder (config.json, model.safetensors, tokenizer.json) that transformers loads.

    `zoo_dir` is a checkpoint folder, or a run folder (its newest checkpoint)."""
    out = Path(out)
    if out.exists() and not force:
        raise CheckpointError(f"{out}: already exists; choose a new output folder (or --force to replace it)")
    zoo_dir = resolve_checkpoint(zoo_dir)
    view = hf_view(load(zoo_dir), arch, drop_sparsity)
    config = dict(view.config)
    if view.dropped:
        config["zoo_trained_sparse"] = [f"{key}: {feature}" for key, feature in view.dropped]
    with view.entry.blame("writing", str(out)):
        tensors = view.converter.store(HFConfig(view.config, "<export>"), view.tensors)
    try:
        with atomic_folder(out) as tmp:
            save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
            (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
            for name in (TOKENIZER, "tokenizer_config.json"):
                if (zoo_dir / name).is_file():
                    shutil.copyfile(zoo_dir / name, tmp / name)
    except OSError as err:
        raise CheckpointError(f"cannot write {out}: {err.strerror or err}") from None
    return out
