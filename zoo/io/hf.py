"""Hugging Face model folders <-> zoo checkpoints.

An architecture (a `model_type` of transformers) is described once, by three functions:
`recipe(cfg)` turns its config.json into a zoo `[model]` table, `rules(cfg)` says which HF
tensors make each zoo tensor (concatenated along the output dimension, e.g. q, k, v -> qkv),
and, for the layouts zoo can write back, `config(model_cfg)` turns a zoo model into a
config.json. Import and export use the same rules, so they are inverses by construction.
Every config key that changes the function is either implemented or refused by name.
"""

from __future__ import annotations

import json
import shutil
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from zoo.errors import CheckpointError, ZooError, did_you_mean, one_of

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
    """zoo tensor `zoo` = the HF tensors `parts` (name, rows) concatenated along dim 0."""

    zoo: str
    parts: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class Arch:
    """How one transformers `model_type` maps to zoo blocks and tensor names."""

    recipe: Callable[[HFConfig], dict[str, Any]]
    rules: Callable[[HFConfig], list[Rule]]
    config: Callable[[Any], dict[str, Any]] | None = None  # zoo ModelConfig -> config.json, if exportable
    known: frozenset[str] = field(default_factory=frozenset)  # arch-specific keys `recipe` reads


ACTIVATIONS = {
    "silu": {"kind": "silu"}, "swish": {"kind": "silu"}, "gelu": {"kind": "gelu"},
    "gelu_pytorch_tanh": {"kind": "gelu", "approximate": True}, "gelu_new": {"kind": "gelu", "approximate": True},
    "relu": {"kind": "relu"}, "relu2": {"kind": "relu2"},
}


def activation(cfg: HFConfig) -> dict[str, Any]:
    act = cfg.get("hidden_act", "silu")
    if act not in ACTIVATIONS:
        raise cfg.error("hidden_act", f"{act!r} is not supported{did_you_mean(act, ACTIVATIONS)}; "
                                      f"{one_of(ACTIVATIONS)}")
    return dict(ACTIVATIONS[act])


def rope_theta(cfg: HFConfig, default: float) -> float:
    """The RoPE base; any scaling (llama3, yarn, linear, dynamic, ...) or partial rotation is refused."""
    for key in ("rope_parameters", "rope_scaling"):
        params = cfg.data.get(key)
        if params is None:
            continue
        if not isinstance(params, dict):
            raise cfg.error(key, f"expected an object, got {params!r}")
        kind = params.get("rope_type", params.get("type", "default"))
        if kind != "default":
            raise cfg.error(f"{key}.rope_type", f"{kind!r} is not supported: zoo implements plain RoPE only "
                                                f"(rope_type 'default')")
        if params.get("partial_rotary_factor", 1.0) != 1.0:
            raise cfg.error(f"{key}.partial_rotary_factor", "partial rotary embeddings are not supported")
        if params.get("rope_theta") is not None:
            return float(params["rope_theta"])
    cfg.refuse("partial_rotary_factor", lambda v: v == 1.0, "partial rotary embeddings are not supported")
    return float(cfg.get("rope_theta", default))


def max_seq_len(cfg: HFConfig, window: int | None) -> int:
    """max_position_embeddings, capped at a sliding window so that the window never takes effect.

    transformers lets query i see key j when i - j < window; with at most `window` positions
    that holds for every pair, so the zoo model (full causal attention) computes the same function.
    """
    n = int(cfg.need("max_position_embeddings"))
    return min(n, int(window)) if window else n


def sliding_window(cfg: HFConfig) -> int | None:
    """The window that some layer actually uses, or None (Mistral: always; Qwen2: per layer_types)."""
    window = cfg.data.get("sliding_window")
    if not window:
        return None
    types = cfg.data.get("layer_types")
    if types is not None:
        return window if "sliding_attention" in types else None
    if "use_sliding_window" in cfg.data:
        return window if cfg.data["use_sliding_window"] else None
    return window


def dense_recipe(cfg: HFConfig, *, qkv_bias: bool, o_bias: bool, mlp_bias: bool, theta: float) -> dict[str, Any]:
    """The `[model]` table shared by the LLaMA family (pre-norm, RoPE, GQA, GLU)."""
    d, heads = int(cfg.need("hidden_size")), int(cfg.need("num_attention_heads"))
    head_dim = int(cfg.get("head_dim", d // heads))
    return {
        "vocab_size": int(cfg.need("vocab_size")),
        "d_model": d,
        "n_layers": int(cfg.need("num_hidden_layers")),
        "n_heads": heads,
        "n_kv_heads": int(cfg.get("num_key_value_heads", heads)),
        "head_dim": head_dim,
        "max_seq_len": max_seq_len(cfg, sliding_window(cfg)),
        "tie_embeddings": bool(cfg.get("tie_word_embeddings", False)),
        "init_std": float(cfg.get("initializer_range", 0.02)),
        "attention": {"kind": "mha", "qkv_bias": qkv_bias, "o_bias": o_bias},
        "position": {"kind": "rope", "theta": rope_theta(cfg, theta)},
        "norm": {"kind": "rmsnorm", "eps": float(cfg.get("rms_norm_eps", 1e-6))},
        "ffn": {"kind": "glu", "hidden": int(cfg.need("intermediate_size")), "activation": activation(cfg),
                "bias": mlp_bias},
    }


def shapes(cfg: HFConfig) -> tuple[int, int, int, int]:
    """(layers, q rows, k/v rows, GLU hidden) from config.json."""
    d, heads = int(cfg.need("hidden_size")), int(cfg.need("num_attention_heads"))
    hd = int(cfg.get("head_dim", d // heads))
    return int(cfg.need("num_hidden_layers")), heads * hd, int(cfg.get("num_key_value_heads", heads)) * hd, \
        int(cfg.get("intermediate_size", 0))


def attention_rules(cfg: HFConfig, i: int, *, qkv_bias: bool, o_bias: bool) -> list[Rule]:
    _, q, kv, _ = shapes(cfg)
    d = int(cfg.need("hidden_size"))
    p = f"model.layers.{i}.self_attn."
    rules = [Rule(f"blocks.{i}.attn.qkv.linear.weight", ((p + "q_proj.weight", q), (p + "k_proj.weight", kv),
                                                           (p + "v_proj.weight", kv))),
             Rule(f"blocks.{i}.attn.o.linear.weight", ((p + "o_proj.weight", d),))]
    if qkv_bias:
        rules.append(Rule(f"blocks.{i}.attn.qkv.linear.bias", ((p + "q_proj.bias", q), (p + "k_proj.bias", kv),
                                                               (p + "v_proj.bias", kv))))
    if o_bias:
        rules.append(Rule(f"blocks.{i}.attn.o.linear.bias", ((p + "o_proj.bias", d),)))
    return rules


def glu_rules(prefix: str, zoo: str, hidden: int, d: int, bias: bool,
              names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")) -> list[Rule]:
    """A GLU's gate and up (stacked as zoo's up_gate) and down projections."""
    gate, up, down = (prefix + n for n in names)
    rules = [Rule(f"{zoo}.up_gate.linear.weight", ((gate + ".weight", hidden), (up + ".weight", hidden))),
             Rule(f"{zoo}.down.linear.weight", ((down + ".weight", d),))]
    if bias:
        rules += [Rule(f"{zoo}.up_gate.linear.bias", ((gate + ".bias", hidden), (up + ".bias", hidden))),
                  Rule(f"{zoo}.down.linear.bias", ((down + ".bias", d),))]
    return rules


def outer_rules(cfg: HFConfig) -> list[Rule]:
    """Embedding, final norm and (untied) LM head."""
    d, v = int(cfg.need("hidden_size")), int(cfg.need("vocab_size"))
    rules = [Rule("embed.weight", (("model.embed_tokens.weight", v),)),
             Rule("norm.weight", (("model.norm.weight", d),))]
    if not cfg.get("tie_word_embeddings", False):
        rules.append(Rule("head.weight", (("lm_head.weight", v),)))
    return rules


def norm_rules(i: int, d: int) -> list[Rule]:
    p = f"model.layers.{i}."
    return [Rule(f"blocks.{i}.attn_norm.weight", ((p + "input_layernorm.weight", d),)),
            Rule(f"blocks.{i}.ffn_norm.weight", ((p + "post_attention_layernorm.weight", d),))]


def llama_biases(cfg: HFConfig) -> dict[str, bool]:
    model_type = cfg.get("model_type")
    if model_type == "qwen2":
        return {"qkv_bias": True, "o_bias": False, "mlp_bias": False}
    if model_type == "mistral":
        return {"qkv_bias": False, "o_bias": False, "mlp_bias": False}
    attn = bool(cfg.get("attention_bias", False))
    return {"qkv_bias": attn, "o_bias": attn, "mlp_bias": bool(cfg.get("mlp_bias", False))}


def llama_recipe(cfg: HFConfig) -> dict[str, Any]:
    return dense_recipe(cfg, **llama_biases(cfg), theta=10000.0)


def llama_rules(cfg: HFConfig) -> list[Rule]:
    n, _, _, hidden = shapes(cfg)
    b = llama_biases(cfg)
    d = int(cfg.need("hidden_size"))
    rules = outer_rules(cfg)
    for i in range(n):
        rules += norm_rules(i, d) + attention_rules(cfg, i, qkv_bias=b["qkv_bias"], o_bias=b["o_bias"])
        rules += glu_rules(f"model.layers.{i}.mlp.", f"blocks.{i}.ffn", hidden, d, b["mlp_bias"])
    return rules


def common_config(m) -> dict[str, Any]:
    """config.json keys shared by the exportable layouts, from a zoo ModelConfig."""
    return {
        "vocab_size": m.vocab_size, "hidden_size": m.d_model, "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads, "num_key_value_heads": m.kv_heads, "head_dim": m.head_size,
        "max_position_embeddings": m.max_seq_len, "rms_norm_eps": m.norm.config.eps,
        "rope_theta": m.position.config.theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": m.position.config.theta},
        "tie_word_embeddings": m.tie_embeddings, "initializer_range": m.init_std,
        "hidden_act": hf_activation(m.ffn.config.activation), "dtype": m.dtype,
    }


def glu_hidden(m) -> int:
    """The GLU inner width, resolving the recipe's default."""
    from zoo.blocks.ffn import default_hidden

    return m.ffn.config.hidden or default_hidden(m.d_model)


def hf_activation(spec) -> str:
    for name, table in ACTIVATIONS.items():
        if table["kind"] == spec.kind and all(getattr(spec.config, k) == v for k, v in table.items() if k != "kind"):
            return name
    raise CheckpointError(f"model.ffn.activation: {spec.kind!r} has no Hugging Face equivalent; {one_of(ACTIVATIONS)}")


def llama_config(m) -> dict[str, Any]:
    attn, ffn = m.attention.config, m.ffn.config
    if attn.qkv_bias != attn.o_bias:
        raise CheckpointError("model.attention: LLaMA has one attention_bias for q/k/v and o; "
                              "qkv_bias without o_bias is the qwen2 layout (use --arch qwen2)")
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], **common_config(m),
            "intermediate_size": glu_hidden(m), "attention_bias": attn.qkv_bias, "mlp_bias": ffn.bias}


def mistral_config(m) -> dict[str, Any]:
    attn, ffn = m.attention.config, m.ffn.config
    if attn.qkv_bias or attn.o_bias or ffn.bias:
        raise CheckpointError("model: the mistral layout has no biases (use --arch llama or qwen2)")
    return {"model_type": "mistral", "architectures": ["MistralForCausalLM"], **common_config(m),
            "intermediate_size": glu_hidden(m), "sliding_window": None}


def qwen2_config(m) -> dict[str, Any]:
    attn, ffn = m.attention.config, m.ffn.config
    if not attn.qkv_bias or attn.o_bias or ffn.bias:
        raise CheckpointError("model: the qwen2 layout has q/k/v biases and no others "
                              "(attention.qkv_bias = true, o_bias = false, ffn.bias = false)")
    return {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], **common_config(m),
            "intermediate_size": glu_hidden(m), "use_sliding_window": False, "sliding_window": None}


ARCHS: dict[str, Arch] = {
    "llama": Arch(llama_recipe, llama_rules, llama_config, frozenset()),
    "mistral": Arch(llama_recipe, llama_rules, mistral_config, frozenset()),
    "qwen2": Arch(llama_recipe, llama_rules, qwen2_config, frozenset()),
}


def arch_of(cfg: HFConfig) -> Arch:
    model_type = cfg.need("model_type")
    if model_type not in ARCHS:
        raise cfg.error("model_type", f"{model_type!r} is not supported{did_you_mean(model_type, ARCHS)}; "
                                      f"{one_of(ARCHS)}")
    return ARCHS[model_type]


def check_quantization(cfg: HFConfig) -> None:
    q = cfg.data.get("quantization_config")
    if q is not None:
        raise cfg.error("quantization_config", f"quantized checkpoints ({q.get('quant_method', q)!r}) are not "
                                               "supported; convert a full-precision folder")


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
        parts = []
        for name, rows in rule.parts:
            t = source(name)
            shape = (rows, *want.shape[1:])
            if tuple(t.shape) != shape:
                raise CheckpointError(f"{where}: tensor {name!r} has shape {tuple(t.shape)}, "
                                      f"config.json implies {shape}")
            parts.append(t.to(want.dtype))
        state[rule.zoo] = torch.cat(parts) if len(parts) > 1 else parts[0]
    return state


# -- import ----------------------------------------------------------------------------------


def hf_recipe(cfg: HFConfig, dtype: str | None = None, max_len: int | None = None, name: str = ""):
    """The zoo Recipe equivalent to a config.json."""
    from zoo.recipe.recipe import recipe_from_dict

    check_quantization(cfg)
    arch = arch_of(cfg)
    model = arch.recipe(cfg)
    unknown = sorted(set(cfg.data) - GENERIC_KEYS - arch.known - {"quantization_config"})
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
    from zoo.model.build import build

    folder = Path(path)
    cfg = HFConfig.read(folder)
    recipe = hf_recipe(cfg, dtype, max_seq_len, name=folder.name)
    tensors = HFTensors(folder)
    model = build(recipe)
    expected = model.state_dict()
    rules = arch_of(cfg).rules(cfg)
    state = gather(rules, tensors.get, expected, str(folder))
    if recipe.model.tie_embeddings:
        state["head.weight"] = state["embed.weight"]
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ZooError(f"internal: the {cfg.data['model_type']} rules leave zoo tensor {missing[0]!r} unset")
    model.load_state_dict(state, strict=True)
    return model, recipe


def tokenizer_files(folder: Path) -> dict[str, bytes]:
    """tokenizer.json (and its config) when the folder has them, to travel with the checkpoint."""
    return {name: (folder / name).read_bytes() for name in (TOKENIZER, "tokenizer_config.json")
            if (folder / name).is_file()}


def convert_hf(src: str | Path, out: str | Path, dtype: str | None = None, max_seq_len: int | None = None) -> Path:
    """Write the zoo checkpoint of a Hugging Face folder (recipe, weights, tokenizer.json)."""
    from zoo.io.checkpoint import save

    src = Path(src)
    model, _ = from_hf(src, dtype, max_seq_len)
    cfg = HFConfig.read(src)
    return save(model, out, meta={"source": {"format": "hf", "path": str(src), "model_type": cfg.data["model_type"]}},
                files=tokenizer_files(src))


# -- export ----------------------------------------------------------------------------------


def exportable(recipe) -> None:
    """Refuse, by key path, what a transformers layout cannot express."""
    m = recipe.model
    checks = [("model.attention.kind", m.attention.kind, "mha"), ("model.position.kind", m.position.kind, "rope"),
              ("model.norm.kind", m.norm.kind, "rmsnorm"), ("model.weights.kind", m.weights.kind, "fp"),
              ("model.sparsity.kind", m.sparsity.kind, "none")]
    for key, value, want in checks:
        if value != want:
            raise CheckpointError(f"{key}: {value!r} cannot be exported to Hugging Face (needs {want!r})")
    for spec, key in ((m.weights, "model.weights.roles"), (m.sparsity, "model.sparsity.roles")):
        if spec.roles:
            raise CheckpointError(f"{key}: per-role overrides cannot be exported to Hugging Face")
    if m.layers:
        raise CheckpointError("model.layers: per-layer patterns cannot be exported to Hugging Face")
    extra = {f.name for f in type(m.attention.config).__dataclass_fields__.values()} - {"qkv_bias", "o_bias"}
    for key in sorted(extra):
        default = type(m.attention.config).__dataclass_fields__[key].default
        if getattr(m.attention.config, key) != default:
            raise CheckpointError(f"model.attention.{key}: cannot be exported to a llama/mistral/qwen2 layout")


def default_arch(recipe) -> str:
    m = recipe.model
    if m.ffn.kind != "glu":
        raise CheckpointError(f"model.ffn.kind: {m.ffn.kind!r} cannot be exported (dense layouts need 'glu')")
    a = m.attention.config
    return "qwen2" if a.qkv_bias and not a.o_bias else "llama"


EXPORTERS: dict[str, Callable[[Any], str]] = {}  # ffn kind -> default model_type, for non-dense layouts


def export_hf(zoo_dir: str | Path, out: str | Path, arch: str | None = None) -> Path:
    """Write a Hugging Face folder (config.json, model.safetensors, tokenizer.json) that transformers loads."""
    from zoo.io.checkpoint import load

    zoo_dir, out = Path(zoo_dir), Path(out)
    if out.exists():
        raise CheckpointError(f"{out}: already exists; choose a new output folder")
    model = load(zoo_dir)
    recipe = model.recipe
    exportable(recipe)
    kind = recipe.model.ffn.kind
    arch = arch or EXPORTERS.get(kind, default_arch)(recipe)
    if arch not in ARCHS or ARCHS[arch].config is None:
        writable = [k for k, a in ARCHS.items() if a.config is not None]
        raise CheckpointError(f"--arch {arch!r} cannot be written{did_you_mean(arch, writable)}; {one_of(writable)}")
    config = ARCHS[arch].config(recipe.model)
    cfg = HFConfig(config, "<export>")
    state = {k: v.detach() for k, v in model.state_dict().items()}
    tensors: dict[str, torch.Tensor] = {}
    for rule in ARCHS[arch].rules(cfg):
        pieces = state[rule.zoo].split([rows for _, rows in rule.parts])
        for (name, _), t in zip(rule.parts, pieces):
            tensors[name] = t.contiguous().clone()
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir(parents=True)
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        for name in (TOKENIZER, "tokenizer_config.json"):
            if (zoo_dir / name).is_file():
                shutil.copyfile(zoo_dir / name, tmp / name)
        tmp.rename(out)
    except OSError as err:
        raise CheckpointError(f"cannot write {out}: {err.strerror or err}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
