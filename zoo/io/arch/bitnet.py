"""BitNet b1.58 (transformers `bitnet`, GGUF `bitnet`): ReLU² (llama.cpp: SiLU), SubLN norms; quantized
folders and ternary GGUF files -> frozen bitnet158, and back."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from zoo.errors import CheckpointError
from zoo.io.arch import GGUFLayout
from zoo.io.arch.llama import GGUF_KEYS, GGUF_TENSORS, Llama, dense_config, shapes
from zoo.io.hf import HFConfig, Rule, gather
from zoo.io.ternary import pack_hf_ternary
from zoo.kernels.ternary import pack_ternary

PROJECTIONS = tuple(f"model.layers.{{i}}.{p}.weight" for p in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
    "mlp.down_proj"))
# How `zoo export` writes ternary projections to transformers: unpacked or packed W̃ and β (exact).
STORED = {"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "offline"}


def quantization(cfg: HFConfig) -> dict[str, Any] | None:
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


def unpack_hf_ternary(packed: torch.Tensor) -> torch.Tensor:
    """transformers' packed BitNet weight [R, in] uint8 -> ternary [4R, in] float.

    Byte row r holds rows r, r + R, r + 2R, r + 3R at bits 0-1, 2-3, 4-5, 6-7, each as w̃ + 1.
    """
    shifts = torch.arange(0, 8, 2, dtype=torch.uint8).view(4, 1, 1)
    return (((packed.unsqueeze(0) >> shifts) & 3).flatten(0, 1).float() - 1)


def ternary_source(q: dict[str, Any], get: Callable[[str], torch.Tensor],
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
                scale = get(name + "_scale").float()  # one per projection, or one per row (GGUF)
                scale = scale.reshape(()) if scale.numel() == 1 else scale.reshape(-1, 1)
                cache[name] = (t, 1.0 / scale if q["linear_class"] == "bitlinear" else scale)
        return cache[name]

    def source(name: str) -> torch.Tensor:
        if name.endswith("_scale") and name[: -len("_scale")] in projections:
            t, beta = weight(name[: -len("_scale")])
            return beta.expand(t.shape[0], 1)
        return weight(name)[0] if name in projections else get(name)

    return source


class BitNet(Llama):
    """BitNet b1.58: LLaMA layout with ReLU² and SubLN norms before o and down; RoPE base 500000.

    GGUF `bitnet` (llama.cpp): NeoX RoPE (q/k not permuted), the head always tied to the embedding,
    and SiLU(gate)·up in the FFN; ternary projections as TQ1_0 / TQ2_0 blocks whose scale is β.
    """

    theta = 5e5
    exports = frozenset({"model.attention.sub_norm", "model.ffn.sub_norm", "model.weights"})
    gguf = GGUFLayout(
        "bitnet", False,
        {**GGUF_TENSORS, "model.layers.{i}.self_attn.attn_sub_norm.weight": "blk.{i}.attn_sub_norm.weight",
         "model.layers.{i}.mlp.ffn_sub_norm.weight": "blk.{i}.ffn_sub_norm.weight"},
        GGUF_KEYS,
        fixed=(("hidden_act", "silu", "llama.cpp's bitnet computes SiLU(gate)·up; it has no ReLU² FFN"),
               ("tie_word_embeddings", True, "llama.cpp's bitnet has no separate output head (it reuses token_embd)"),
               ("quantization_config", STORED, None)),
        ternary=PROJECTIONS)

    def recipe(self, cfg: HFConfig) -> dict[str, Any]:
        """Quantized checkpoints become frozen `bitnet158` weights with one β per output row."""
        model = super().recipe(cfg)
        sub = {"kind": "rmsnorm", "eps": model["norm"]["eps"]}
        model["attention"]["sub_norm"] = sub
        model["ffn"]["sub_norm"] = sub
        if quantization(cfg) is not None:
            model["weights"] = {"kind": "bitnet158", "input_norm": False, "scale": "row"}
        return model

    def rules(self, cfg: HFConfig) -> list[Rule]:
        rules = super().rules(cfg)
        d, hidden = int(cfg.need("hidden_size")), shapes(cfg)[3]
        for i in range(shapes(cfg)[0]):
            p = f"model.layers.{i}."
            rules += [Rule(f"blocks.{i}.attn.sub_norm.weight", ((p + "self_attn.attn_sub_norm.weight", d),)),
                      Rule(f"blocks.{i}.ffn.sub_norm.weight", ((p + "mlp.ffn_sub_norm.weight", hidden),))]
        return rules

    def config(self, m) -> dict[str, Any]:
        attn, ffn = m.attention.config, m.ffn.config
        eps = m.norm.config.eps
        for key, sub in (("model.attention.sub_norm", attn.sub_norm), ("model.ffn.sub_norm", ffn.sub_norm)):
            if sub is None or sub.kind != "rmsnorm" or sub.config.eps != eps:
                raise CheckpointError(f"{key}: the bitnet layout needs an RMSNorm sub-norm with model.norm's eps {eps}")
        if attn.qkv_bias != attn.o_bias or ffn.bias:
            raise CheckpointError("model.attention: the bitnet layout has one attention_bias and no FFN biases")
        config = {"model_type": "bitnet", "architectures": ["BitNetForCausalLM"], **dense_config(m),
                  "attention_bias": attn.qkv_bias}
        if m.weights.kind == "bitnet158":
            config["quantization_config"] = dict(STORED)
        return config

    def store(self, cfg: HFConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Ternary projections as transformers' packed uint8 W̃ plus `weight_scale` β (one per projection)."""
        if cfg.data.get("quantization_config") is None:
            return tensors
        out = dict(tensors)
        for i in range(shapes(cfg)[0]):
            for name in (p.format(i=i) for p in PROJECTIONS):
                w = tensors[name].float()
                beta = w.abs().amax()
                t = w / beta if beta > 0 else w
                if not torch.equal(t, t.round().clamp(-1, 1)):
                    raise CheckpointError(f"{name}: its rows have different β (model.weights.scale = \"row\"); "
                                          "transformers' BitNet stores one weight_scale per projection (export "
                                          "it to GGUF instead, which keeps a β per row)")
                if t.shape[0] % 4:
                    raise CheckpointError(f"{name}: {t.shape[0]} rows; transformers packs 4 rows per byte row")
                out[name] = pack_hf_ternary(t)
                out[name + "_scale"] = (beta if beta > 0 else torch.ones(())).reshape(1)
        return out

    def check_quantization(self, cfg: HFConfig) -> None:
        """BitNet's own quantization_config (quant_method "bitnet") is read; any other is refused."""
        q = cfg.data.get("quantization_config")
        if not (isinstance(q, dict) and q.get("quant_method") == "bitnet"):
            super().check_quantization(cfg)

    def load(self, cfg: HFConfig, model, get: Callable[[str], torch.Tensor], where: str) -> dict[str, torch.Tensor]:
        """Weights of a BitNet folder; quantized ones go into the frozen (packed) zoo projections."""
        rules = self.rules(cfg)
        q = quantization(cfg)
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
        state = gather(split, ternary_source(q, get, projections), expected, where)
        for name in [k for k in state if k.endswith(".ternary")]:
            state[name[: -len("ternary")] + "packed"] = pack_ternary(state.pop(name))
        return state


def register(registry) -> None:
    registry.register("converter", "bitnet", BitNet, BitNet)
