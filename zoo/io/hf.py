"""Hugging Face model folders <-> zoo checkpoints.

An architecture (a `model_type` of transformers) is described once, by three functions:
`recipe(cfg)` turns its config.json into a zoo `[model]` table, `rules(cfg)` says which HF
tensors make each zoo tensor (concatenated along the output dimension, e.g. q, k, v -> qkv),
and, for the layouts zoo can write back, `config(model_cfg)` turns a zoo model into a
config.json. Import and export use the same rules, so they are inverses by construction.
Every config key that changes the function is either implemented or refused by name.
"""

from __future__ import annotations

import dataclasses
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


@dataclass(frozen=True)
class Arch:
    """How one transformers `model_type` maps to zoo blocks and tensor names."""

    recipe: Callable[[HFConfig], dict[str, Any]]
    rules: Callable[[HFConfig], list[Rule]]
    config: Callable[[Any], dict[str, Any]] | None = None  # zoo ModelConfig -> config.json, if exportable
    known: frozenset[str] = field(default_factory=frozenset)  # arch-specific keys `recipe` reads
    load: Callable[..., dict[str, torch.Tensor]] | None = None  # (cfg, model, get, where) -> state, if not `rules`


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


# Attention and FFN biases of each layout (None: read `attention_bias` / `mlp_bias` / `qkv_bias`).
BIASES = {"qwen2": (True, False, False), "mistral": (False, False, False), "mixtral": (False, False, False)}
# RoPE base when config.json names none (transformers' `default_theta` of each config class).
THETA = {"mixtral": 1e6, "bitnet": 5e5}


def biases(cfg: HFConfig) -> dict[str, bool]:
    """qkv_bias, o_bias, mlp_bias of this config."""
    model_type = cfg.get("model_type")
    if model_type in BIASES:
        qkv, o, mlp = BIASES[model_type]
    elif model_type == "qwen2_moe":
        qkv, o, mlp = bool(cfg.get("qkv_bias", True)), False, False
    else:
        qkv = o = bool(cfg.get("attention_bias", False))
        mlp = bool(cfg.get("mlp_bias", False))
    return {"qkv_bias": qkv, "o_bias": o, "mlp_bias": mlp}


def llama_recipe(cfg: HFConfig) -> dict[str, Any]:
    return dense_recipe(cfg, **biases(cfg), theta=THETA.get(cfg.get("model_type"), 10000.0))


def decoder_rules(cfg: HFConfig, ffn: Callable[[int], list[Rule]], qk_norm: bool = False) -> list[Rule]:
    """Embedding, head, and per layer: norms, attention (+ q/k norms), and the FFN's rules `ffn(i)`."""
    n, q, kv, _ = shapes(cfg)
    b = biases(cfg)
    d = int(cfg.need("hidden_size"))
    rules = outer_rules(cfg)
    for i in range(n):
        rules += norm_rules(i, d) + attention_rules(cfg, i, qkv_bias=b["qkv_bias"], o_bias=b["o_bias"])
        if qk_norm:
            p = f"model.layers.{i}.self_attn."
            rules += [Rule(f"blocks.{i}.attn.q_norm.weight", ((p + "q_norm.weight", q),)),
                      Rule(f"blocks.{i}.attn.k_norm.weight", ((p + "k_norm.weight", kv),))]
        rules += ffn(i)
    return rules


def llama_rules(cfg: HFConfig) -> list[Rule]:
    _, _, _, hidden = shapes(cfg)
    d, bias = int(cfg.need("hidden_size")), biases(cfg)["mlp_bias"]
    return decoder_rules(cfg, lambda i: glu_rules(f"model.layers.{i}.mlp.", f"blocks.{i}.ffn", hidden, d, bias))


# -- mixture of experts ----------------------------------------------------------------------


def moe_table(cfg: HFConfig, experts_key: str, hidden: int, renormalize: bool) -> dict[str, Any]:
    """The zoo `moe` FFN table: softmax top-k router in fp32, GLU experts, no z-loss."""
    return {
        "kind": "moe",
        "num_experts": int(cfg.need(experts_key)),
        "top_k": int(cfg.need("num_experts_per_tok")),
        "expert": {"kind": "glu", "hidden": hidden, "activation": activation(cfg)},
        "router": {"kind": "softmax_topk", "renormalize": renormalize,
                   "jitter": float(cfg.get("router_jitter_noise", 0.0))},
        "aux_loss": float(cfg.get("router_aux_loss_coef", 0.01)),
        "z_loss": 0.0,
    }


def expert_rules(i: int, prefix: str, experts: int, hidden: int, d: int,
                 names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")) -> list[Rule]:
    """Router and stacked experts of a MoE layer whose HF tensors live under `prefix`."""
    gate, up, down = (f"{prefix}experts.{{e}}.{n}.weight" for n in names)
    z = f"blocks.{i}.ffn."
    return [Rule(z + "router.weight", ((prefix + "gate.weight", experts),)),
            Rule(z + "experts.up_gate.linear.weight", ((gate, hidden), (up, hidden)), experts),
            Rule(z + "experts.down.linear.weight", ((down, d),), experts)]


def mixtral_recipe(cfg: HFConfig) -> dict[str, Any]:
    model = llama_recipe(cfg)
    model["ffn"] = moe_table(cfg, "num_local_experts", int(cfg.need("intermediate_size")), renormalize=True)
    return model


def mixtral_rules(cfg: HFConfig) -> list[Rule]:
    _, _, _, hidden = shapes(cfg)
    d, e = int(cfg.need("hidden_size")), int(cfg.need("num_local_experts"))
    return decoder_rules(cfg, lambda i: expert_rules(i, f"model.layers.{i}.block_sparse_moe.", e, hidden, d,
                                                     ("w1", "w3", "w2")))


def qwen2_moe_sparse(cfg: HFConfig, i: int) -> bool:
    """transformers' rule for which Qwen2-MoE layers are MoE (the others are dense GLUs)."""
    return i not in (cfg.get("mlp_only_layers", []) or []) and int(cfg.need("num_experts")) > 0 \
        and (i + 1) % int(cfg.get("decoder_sparse_step", 1)) == 0


def qwen2_moe_recipe(cfg: HFConfig) -> dict[str, Any]:
    model = llama_recipe(cfg)
    ffn = moe_table(cfg, "num_experts", int(cfg.need("moe_intermediate_size")),
                    renormalize=bool(cfg.get("norm_topk_prob", False)))
    ffn.update(shared_experts=1, shared_hidden=int(cfg.need("shared_expert_intermediate_size")), shared_gate=True)
    dense = model["ffn"]
    model["ffn"] = ffn
    model["layers"] = [{"range": str(i), "ffn": dense} for i in range(model["n_layers"])
                       if not qwen2_moe_sparse(cfg, i)]
    return model


def qwen2_moe_rules(cfg: HFConfig) -> list[Rule]:
    _, _, _, hidden = shapes(cfg)
    d = int(cfg.need("hidden_size"))
    moe_hidden, shared = int(cfg.need("moe_intermediate_size")), int(cfg.need("shared_expert_intermediate_size"))

    def ffn(i: int) -> list[Rule]:
        p = f"model.layers.{i}.mlp."
        if not qwen2_moe_sparse(cfg, i):
            return glu_rules(p, f"blocks.{i}.ffn", hidden, d, False)
        return (expert_rules(i, p, int(cfg.need("num_experts")), moe_hidden, d)
                + glu_rules(p + "shared_expert.", f"blocks.{i}.ffn.shared", shared, d, False)
                + [Rule(f"blocks.{i}.ffn.shared_gate.weight", ((p + "shared_expert_gate.weight", 1),))])

    return decoder_rules(cfg, ffn)


def olmoe_recipe(cfg: HFConfig) -> dict[str, Any]:
    cfg.refuse("clip_qkv", lambda v: False, "clamping q/k/v is not implemented")
    model = llama_recipe(cfg)
    model["attention"]["qk_norm"] = True
    model["ffn"] = moe_table(cfg, "num_experts", int(cfg.need("intermediate_size")),
                             renormalize=bool(cfg.get("norm_topk_prob", False)))
    return model


def olmoe_rules(cfg: HFConfig) -> list[Rule]:
    _, _, _, hidden = shapes(cfg)
    d, e = int(cfg.need("hidden_size")), int(cfg.need("num_experts"))
    return decoder_rules(cfg, lambda i: expert_rules(i, f"model.layers.{i}.mlp.", e, hidden, d), qk_norm=True)


def common_config(m) -> dict[str, Any]:
    """config.json keys shared by the exportable layouts, from a zoo ModelConfig."""
    return {
        "vocab_size": m.vocab_size, "hidden_size": m.d_model, "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads, "num_key_value_heads": m.kv_heads, "head_dim": m.head_size,
        "max_position_embeddings": m.max_seq_len, "rms_norm_eps": m.norm.config.eps,
        "rope_theta": m.position.config.theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": m.position.config.theta},
        "tie_word_embeddings": m.tie_embeddings, "initializer_range": m.init_std,
        "dtype": m.dtype,
    }


def dense_config(m) -> dict[str, Any]:
    """config.json keys of a dense (GLU) zoo model."""
    from zoo.blocks.ffn import default_hidden

    if m.ffn.kind != "glu":
        raise CheckpointError(f"model.ffn.kind: {m.ffn.kind!r} cannot be written as a dense layout (needs 'glu')")
    return {**common_config(m), "intermediate_size": m.ffn.config.hidden or default_hidden(m.d_model),
            "hidden_act": hf_activation(m.ffn.config.activation)}


def expert_hidden(m) -> int:
    """The width of one expert of a `moe` FFN, resolving its default."""
    from zoo.blocks.ffn import default_hidden

    return m.ffn.config.expert.config.hidden or default_hidden(m.d_model)


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
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], **dense_config(m),
            "attention_bias": attn.qkv_bias, "mlp_bias": ffn.bias}


def mistral_config(m) -> dict[str, Any]:
    attn, ffn = m.attention.config, m.ffn.config
    if attn.qkv_bias or attn.o_bias or ffn.bias:
        raise CheckpointError("model: the mistral layout has no biases (use --arch llama or qwen2)")
    return {"model_type": "mistral", "architectures": ["MistralForCausalLM"], **dense_config(m),
            "sliding_window": None}


def mixtral_config(m) -> dict[str, Any]:
    if m.ffn.kind != "moe":
        raise CheckpointError(f"model.ffn.kind: the mixtral layout needs a 'moe' FFN, not {m.ffn.kind!r}")
    ffn = m.ffn.config
    expert, router = ffn.expert, ffn.router
    only_defaults(expert.config, {"hidden", "activation"}, "model.ffn.expert")
    checks = [("model.ffn.expert.kind", expert.kind == "glu", "GLU experts"),
              ("model.ffn.expert.bias", not getattr(expert.config, "bias", False), "experts without biases"),
              ("model.ffn.router.kind", router.kind == "softmax_topk", "the softmax_topk router"),
              ("model.ffn.router.renormalize", getattr(router.config, "renormalize", False),
               "renormalised top-k gates"),
              ("model.ffn.shared_experts", not ffn.shared_experts, "no shared experts"),
              ("model.ffn.capacity_factor", ffn.capacity_factor is None, "dropless routing"),
              ("model.attention", not (m.attention.config.qkv_bias or m.attention.config.o_bias), "no biases")]
    for key, ok, need in checks:
        if not ok:
            raise CheckpointError(f"{key}: the mixtral layout needs {need}")
    return {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], **common_config(m),
            "hidden_act": hf_activation(expert.config.activation), "intermediate_size": expert_hidden(m),
            "num_local_experts": ffn.num_experts, "num_experts_per_tok": ffn.top_k,
            "router_aux_loss_coef": ffn.aux_loss, "router_jitter_noise": router.config.jitter, "sliding_window": None}


def qwen2_config(m) -> dict[str, Any]:
    attn, ffn = m.attention.config, m.ffn.config
    if not attn.qkv_bias or attn.o_bias or ffn.bias:
        raise CheckpointError("model: the qwen2 layout has q/k/v biases and no others "
                              "(attention.qkv_bias = true, o_bias = false, ffn.bias = false)")
    return {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], **dense_config(m),
            "use_sliding_window": False, "sliding_window": None}


# -- BitNet b1.58 ----------------------------------------------------------------------------


def bitnet_quantization(cfg: HFConfig) -> dict[str, Any] | None:
    """The checkpoint's BitNet quantization_config (validated), or None for full-precision weights.

    transformers' `bitlinear` stores packed ternary weights and computes W̃ / weight_scale;
    `autobitlinear` stores ternary (packed or not) and computes W̃ · weight_scale, or, with
    quantization_mode "online", latent weights ternarised at run time with β = max(mean|W|, 1e-5).
    """
    q = cfg.data.get("quantization_config")
    if q is None:
        return None
    key = "quantization_config"
    q = {"linear_class": "bitlinear", "quantization_mode": "offline", "use_rms_norm": False, **q}
    if q["linear_class"] not in ("bitlinear", "autobitlinear"):
        raise cfg.error(f"{key}.linear_class", f"{q['linear_class']!r} is not supported; one of: autobitlinear, "
                                               "bitlinear")
    if q["quantization_mode"] not in ("offline", "online"):
        raise cfg.error(f"{key}.quantization_mode", f"{q['quantization_mode']!r} is not supported; "
                                                    "one of: offline, online")
    if q["linear_class"] == "bitlinear" and q["quantization_mode"] == "online":
        raise cfg.error(f"{key}.quantization_mode", "'online' needs linear_class 'autobitlinear'")
    if q["use_rms_norm"]:
        raise cfg.error(f"{key}.use_rms_norm", "a norm inside every BitLinear is not supported (zoo's fused q/k/v "
                                               "and gate/up projections share one input norm)")
    skipped = set(q.get("modules_to_not_convert") or []) - {"lm_head"}
    if skipped:
        raise cfg.error(f"{key}.modules_to_not_convert", f"{sorted(skipped)} kept in full precision is not "
                                                         "supported (zoo quantizes every projection)")
    return q


def bitnet_recipe(cfg: HFConfig) -> dict[str, Any]:
    """LLaMA layout with ReLU² and SubLN norms before o and down; quantized checkpoints -> frozen bitnet158."""
    model = llama_recipe(cfg)
    sub = {"kind": "rmsnorm", "eps": model["norm"]["eps"]}
    model["attention"]["sub_norm"] = sub
    model["ffn"]["sub_norm"] = sub
    if bitnet_quantization(cfg) is not None:
        model["weights"] = {"kind": "bitnet158", "input_norm": False, "scale": "row"}
    return model


def bitnet_rules(cfg: HFConfig) -> list[Rule]:
    rules = llama_rules(cfg)
    d, hidden = int(cfg.need("hidden_size")), shapes(cfg)[3]
    for i in range(shapes(cfg)[0]):
        p = f"model.layers.{i}."
        rules += [Rule(f"blocks.{i}.attn.sub_norm.weight", ((p + "self_attn.attn_sub_norm.weight", d),)),
                  Rule(f"blocks.{i}.ffn.sub_norm.weight", ((p + "mlp.ffn_sub_norm.weight", hidden),))]
    return rules


def unpack_hf_ternary(packed: torch.Tensor) -> torch.Tensor:
    """transformers' packed BitNet weight [R, in] uint8 -> ternary [4R, in] float.

    Byte row r holds rows r, r + R, r + 2R, r + 3R at bits 0-1, 2-3, 4-5, 6-7, each as w̃ + 1.
    """
    shifts = torch.arange(0, 8, 2, dtype=torch.uint8).view(4, 1, 1)
    return (((packed.unsqueeze(0) >> shifts) & 3).flatten(0, 1).float() - 1)


def bitnet_ternary(q: dict[str, Any], get: Callable[[str], torch.Tensor],
                   projections: set[str]) -> Callable[[str], torch.Tensor]:
    """get(name) for a quantized BitNet folder: a projection's "<proj>.weight" -> W̃ (float, unpacked)
    and "<proj>.weight_scale" -> β per row ([rows, 1]), so that it computes W̃·β; others unchanged."""
    cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def weight(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if name not in cache:
            w = get(name)
            if q["quantization_mode"] == "online":
                s = 1.0 / w.float().abs().mean().clamp(min=1e-5)
                cache[name] = ((w.float() * s).round().clamp(-1, 1), 1.0 / s)
            else:
                t = unpack_hf_ternary(w) if w.dtype == torch.uint8 else w.float()
                scale = get(name + "_scale").float().reshape(())
                cache[name] = (t, 1.0 / scale if q["linear_class"] == "bitlinear" else scale)
        return cache[name]

    def source(name: str) -> torch.Tensor:
        if name.endswith("_scale") and name[: -len("_scale")] in projections:
            t, beta = weight(name[: -len("_scale")])
            return beta.expand(t.shape[0], 1)
        return weight(name)[0] if name in projections else get(name)

    return source


def bitnet_load(cfg: HFConfig, model, get: Callable[[str], torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """Weights of a BitNet folder; quantized ones go into the frozen (packed) zoo projections."""
    from zoo.kernels.ternary import pack_ternary

    rules = bitnet_rules(cfg)
    q = bitnet_quantization(cfg)
    if q is None:
        return gather(rules, get, model.state_dict(), where)
    model.freeze()
    expected = dict(model.state_dict())
    split: list[Rule] = []
    projections = set()
    for rule in rules:
        if not rule.zoo.endswith(".linear.weight"):
            split.append(rule)
            continue
        base = rule.zoo[: -len("weight")]
        linear = model.get_submodule(base[:-1])
        expected[base + "ternary"] = torch.empty(linear.out_features, linear.in_features)
        split += [Rule(base + "ternary", rule.parts),
                  Rule(base + "scale", tuple((name + "_scale", rows) for name, rows in rule.parts))]
        projections |= {name for name, _ in rule.parts}
    state = gather(split, bitnet_ternary(q, get, projections), expected, where)
    for name in [k for k in state if k.endswith(".ternary")]:
        state[name[: -len("ternary")] + "packed"] = pack_ternary(state.pop(name))
    return state


MOE_KEYS = frozenset({"num_experts_per_tok", "norm_topk_prob"})
ARCHS: dict[str, Arch] = {
    "llama": Arch(llama_recipe, llama_rules, llama_config),
    "mistral": Arch(llama_recipe, llama_rules, mistral_config),
    "qwen2": Arch(llama_recipe, llama_rules, qwen2_config),
    "mixtral": Arch(mixtral_recipe, mixtral_rules, mixtral_config, MOE_KEYS | {"num_local_experts"}),
    "qwen2_moe": Arch(qwen2_moe_recipe, qwen2_moe_rules, None, MOE_KEYS | {
        "num_experts", "moe_intermediate_size", "shared_expert_intermediate_size", "decoder_sparse_step",
        "mlp_only_layers"}),
    "olmoe": Arch(olmoe_recipe, olmoe_rules, None, MOE_KEYS | {"num_experts", "clip_qkv"}),
    "bitnet": Arch(bitnet_recipe, bitnet_rules, None, frozenset(), load=bitnet_load),
}


def arch_of(cfg: HFConfig) -> Arch:
    model_type = cfg.need("model_type")
    if model_type not in ARCHS:
        raise cfg.error("model_type", f"{model_type!r} is not supported{did_you_mean(model_type, ARCHS)}; "
                                      f"{one_of(ARCHS)}")
    return ARCHS[model_type]


def check_quantization(cfg: HFConfig) -> None:
    q = cfg.data.get("quantization_config")
    if q is not None and not (cfg.get("model_type") == "bitnet" and isinstance(q, dict)
                              and q.get("quant_method") == "bitnet"):
        method = q.get("quant_method", q) if isinstance(q, dict) else q
        raise cfg.error("quantization_config", f"quantized checkpoints ({method!r}) are not supported "
                                               "(only BitNet's own); convert a full-precision folder")


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
    load_weights(model, cfg, tensors.get, str(folder))
    return model, recipe


def load_weights(model, cfg: HFConfig, get: Callable[[str], torch.Tensor], where: str) -> None:
    """Fill `model` from the HF-named tensors that `get` serves, by the architecture's rules."""
    arch = arch_of(cfg)
    state = arch.load(cfg, model, get, where) if arch.load else gather(arch.rules(cfg), get, model.state_dict(), where)
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
    from zoo.io.checkpoint import save

    out = Path(out)
    if TOKENIZER in files:
        spec = {"kind": "file", "path": str(out.resolve() / TOKENIZER)}
        model.recipe = model.recipe.replace(**{"data.tokenizer": spec})
    return save(model, out, meta={"source": source}, files=files)


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
    only_defaults(m.attention.config, {"qkv_bias", "o_bias"}, "model.attention")
    if m.ffn.kind == "glu":
        only_defaults(m.ffn.config, {"hidden", "activation", "bias"}, "model.ffn")


def only_defaults(config: Any, allowed: set[str], key: str) -> None:
    """Refuse a block option outside `allowed` that is not at its default (e.g. sub-norms, qk_norm)."""
    for f in dataclasses.fields(config):
        if f.name not in allowed and getattr(config, f.name) != f.default:
            raise CheckpointError(f"{key}.{f.name}: cannot be exported to a transformers layout "
                                  f"(only its default {f.default!r})")


def default_arch(recipe) -> str:
    """mixtral for a MoE FFN; else qwen2 for q/k/v-only biases, else llama."""
    m = recipe.model
    if m.ffn.kind == "moe":
        return "mixtral"
    a = m.attention.config
    return "qwen2" if a.qkv_bias and not a.o_bias else "llama"


def export_hf(zoo_dir: str | Path, out: str | Path, arch: str | None = None) -> Path:
    """Write a Hugging Face folder (config.json, model.safetensors, tokenizer.json) that transformers loads.

    `zoo_dir` is a checkpoint folder, or a run folder (its newest checkpoint)."""
    from zoo.io.checkpoint import load
    from zoo.train.state import resolve_checkpoint

    out = Path(out)
    if out.exists():
        raise CheckpointError(f"{out}: already exists; choose a new output folder")
    zoo_dir = resolve_checkpoint(zoo_dir)
    model = load(zoo_dir)
    recipe = model.recipe
    exportable(recipe)
    arch = arch or default_arch(recipe)
    if arch not in ARCHS or ARCHS[arch].config is None:
        writable = [k for k, a in ARCHS.items() if a.config is not None]
        raise CheckpointError(f"--arch {arch!r} cannot be written{did_you_mean(arch, writable)}; {one_of(writable)}")
    config = ARCHS[arch].config(recipe.model)
    cfg = HFConfig(config, "<export>")
    tensors = scatter(ARCHS[arch].rules(cfg), {k: v.detach() for k, v in model.state_dict().items()})
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
