"""LLaMA (transformers `llama`, GGUF `llama`), and the pieces the whole LLaMA family shares.

Pre-norm decoder, RoPE, grouped-query attention, GLU: the other built-in architectures
(mistral, qwen2, mixtral, qwen2_moe, olmoe, bitnet) are this layout with other biases,
FFNs or norms, and subclass `Llama`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from zoo.blocks.ffn import default_hidden
from zoo.errors import CheckpointError, did_you_mean, one_of
from zoo.io.arch import REQUIRED, Converter, GGUFLayout
from zoo.io.hf import HFConfig, Rule

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


def hf_activation(spec) -> str:
    """The hidden_act of a zoo activation block (the inverse of `activation`)."""
    for name, table in ACTIVATIONS.items():
        if table["kind"] == spec.kind and all(getattr(spec.config, k) == v for k, v in table.items() if k != "kind"):
            return name
    raise CheckpointError(f"model.ffn.activation: {spec.kind!r} has no Hugging Face equivalent; {one_of(ACTIVATIONS)}")


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


def common_config(m) -> dict[str, Any]:
    """config.json keys shared by the writable layouts, from a zoo ModelConfig."""
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
    if m.ffn.kind != "glu":
        raise CheckpointError(f"model.ffn.kind: {m.ffn.kind!r} cannot be written as a dense layout (needs 'glu')")
    return {**common_config(m), "intermediate_size": m.ffn.config.hidden or default_hidden(m.d_model),
            "hidden_act": hf_activation(m.ffn.config.activation)}


# GGUF tensor name of each transformers tensor name ("{i}": the layer), as llama.cpp writes them.
GGUF_TENSORS = {
    "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    **{f"model.layers.{{i}}.{hf}": f"blk.{{i}}.{gguf}" for hf, gguf in {
        "input_layernorm.weight": "attn_norm.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
        "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
        "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
        "self_attn.o_proj.weight": "attn_output.weight", "self_attn.o_proj.bias": "attn_output.bias",
        "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }.items()},
}
# GGUF metadata (after "<arch>.") <-> config.json, in reading order (a default may use earlier keys).
GGUF_KEYS = (
    ("embedding_length", "hidden_size", int, REQUIRED),
    ("feed_forward_length", "intermediate_size", int, REQUIRED),
    ("block_count", "num_hidden_layers", int, REQUIRED),
    ("attention.head_count", "num_attention_heads", int, REQUIRED),
    ("attention.head_count_kv", "num_key_value_heads", int, lambda c: c["num_attention_heads"]),
    ("attention.key_length", "head_dim", int, lambda c: c["hidden_size"] // c["num_attention_heads"]),
    ("attention.value_length", "head_dim", int, lambda c: c["head_dim"]),
    ("context_length", "max_position_embeddings", int, REQUIRED),
    ("attention.layer_norm_rms_epsilon", "rms_norm_eps", float, 1e-5),
    ("rope.freq_base", "rope_theta", float, 10000.0),
)


class Llama(Converter):
    """LLaMA: biases from attention_bias / mlp_bias; GGUF `llama` (q/k rows permuted by llama.cpp)."""

    theta: ClassVar[float] = 10000.0  # RoPE base when config.json names none (transformers' default)
    gguf: ClassVar[GGUFLayout | None] = GGUFLayout("llama", True, GGUF_TENSORS, GGUF_KEYS)

    def biases(self, cfg: HFConfig) -> dict[str, bool]:
        """qkv_bias, o_bias, mlp_bias of this config."""
        qkv = bool(cfg.get("attention_bias", False))
        return {"qkv_bias": qkv, "o_bias": qkv, "mlp_bias": bool(cfg.get("mlp_bias", False))}

    def recipe(self, cfg: HFConfig) -> dict[str, Any]:
        return dense_recipe(cfg, **self.biases(cfg), theta=self.theta)

    def decoder_rules(self, cfg: HFConfig, ffn: Callable[[int], list[Rule]], qk_norm: bool = False) -> list[Rule]:
        """Embedding, head, and per layer: norms, attention (+ q/k norms), and the FFN's rules `ffn(i)`."""
        n, q, kv, _ = shapes(cfg)
        b = self.biases(cfg)
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

    def rules(self, cfg: HFConfig) -> list[Rule]:
        _, _, _, hidden = shapes(cfg)
        d, bias = int(cfg.need("hidden_size")), self.biases(cfg)["mlp_bias"]
        return self.decoder_rules(cfg, lambda i: glu_rules(f"model.layers.{i}.mlp.", f"blocks.{i}.ffn", hidden, d,
                                                           bias))

    def config(self, m) -> dict[str, Any]:
        attn, ffn = m.attention.config, m.ffn.config
        if attn.qkv_bias != attn.o_bias:
            raise CheckpointError("model.attention: LLaMA has one attention_bias for q/k/v and o; "
                                  "qkv_bias without o_bias is the qwen2 layout (use --arch qwen2)")
        return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], **dense_config(m),
                "attention_bias": attn.qkv_bias, "mlp_bias": ffn.bias}


def register(registry) -> None:
    registry.register("converter", "llama", Llama, Llama)
