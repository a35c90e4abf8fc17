"""BitNet b1.58 (transformers `bitnet`, GGUF `bitnet`): ReLU² (llama.cpp: SiLU), SubLN norms; quantized
folders and ternary GGUF files -> frozen bitnet158, and back."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from zoo.blocks.bitnet import BitLinear
from zoo.errors import CheckpointError
from zoo.io.arch import GGUFLayout
from zoo.io.arch.llama import GGUF_KEYS, GGUF_TENSORS, Llama, dense_config, shapes
from zoo.io.hf import HFConfig, Rule, gather
from zoo.kernels.ternary import pack_ternary
from zoo.recipe.recipe import recipe_from_dict

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


def pack_hf_ternary(t: torch.Tensor) -> torch.Tensor:
    """Ternary [4R, in] -> transformers' packed uint8 [R, in] (the inverse of `unpack_hf_ternary`)."""
    codes = (t + 1).to(torch.uint8).reshape(4, t.shape[0] // 4, t.shape[1])
    return codes[0] | (codes[1] << 2) | (codes[2] << 4) | (codes[3] << 6)


def split_ternary(w: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """W̃·β (β per row) -> (W̃, β [rows]); CheckpointError naming `name` when a row is not ±β or 0."""
    beta = w.abs().amax(-1)
    t = w / torch.where(beta > 0, beta, 1).unsqueeze(-1)
    if not torch.equal(t, t.round().clamp(-1, 1)):
        raise CheckpointError(f"tensor {name!r} is not ternary (each row must hold only -β, 0 and +β)")
    return t, torch.where(beta > 0, beta, 1)


# zoo's BitNet form (one RMSNorm inside every projection, blocks without pre-norms) -> the SubLN form
# of transformers and llama.cpp: q/k/v's norm is the attention pre-norm, o's the attention sub-norm,
# gate/up's the FFN pre-norm, down's the FFN sub-norm.
NORM_MOVES = {"attn.qkv.linear.norm.weight": "attn_norm.weight", "attn.o.linear.norm.weight": "attn.sub_norm.weight",
              "ffn.up_gate.linear.norm.weight": "ffn_norm.weight", "ffn.down.linear.norm.weight": "ffn.sub_norm.weight"}


def ternary_view(model, recipe):
    """(recipe, state) of a bitnet158 model in the SubLN form with `input_norm = false`, every projection's
    `.linear.weight` holding W̃·β in float32 (from the latent or the frozen weights alike)."""
    m = recipe.model
    if m.ffn.kind != "glu":
        raise CheckpointError(f"model.ffn.kind: {m.ffn.kind!r} with bitnet158 weights cannot be exported "
                              "(transformers' and llama.cpp's BitNet are dense GLU models)")
    state = {}
    linears = {name for name, mod in model.named_modules() if isinstance(mod, BitLinear)}
    for name, t in model.state_dict().items():
        if name.rsplit(".", 1)[0] not in linears:  # a projection's own tensors (its norm stays)
            state[name] = t.detach()
    for name, mod in model.named_modules():
        if name in linears:
            state[name + ".weight"] = mod.quantized_weight(torch.float32).detach()
            if mod.bias is not None:
                state[name + ".bias"] = mod.bias.detach()
    data = recipe.to_dict()
    table = data["model"]
    if not m.weights.config.input_norm:
        return recipe, state
    eps = m.norm.config.eps if m.norm.kind == "rmsnorm" else None
    bare = [n for n in range(m.n_layers) if m.layer(n)["norm"].kind != "none"]
    if bare or any(set(p) - {"range", "every", "norm"} for p in table.get("layers", [])):
        raise CheckpointError("model.weights.input_norm: a norm inside every projection and the blocks' pre-norms "
                              "are two norms before q/k/v; transformers' and llama.cpp's BitNet have one (set "
                              "[[model.layers]] norm = \"none\" for all layers, as recipes/tiny/bitnet.toml)")
    if m.attention.config.sub_norm or m.ffn.config.sub_norm:
        raise CheckpointError("model.attention.sub_norm: with input_norm = true the o and down projections "
                              "already normalise their input; a sub_norm as well cannot be exported")
    if m.weights.config.norm_eps != eps:
        raise CheckpointError(f"model.weights.norm_eps: {m.weights.config.norm_eps} differs from model.norm.eps "
                              f"{eps}; transformers' and llama.cpp's BitNet have one rms_norm_eps")
    for n in range(m.n_layers):
        for src, dst in NORM_MOVES.items():
            state[f"blocks.{n}.{dst}"] = state.pop(f"blocks.{n}.{src}")
    sub = {"kind": "rmsnorm", "eps": eps}
    table["layers"] = []
    table["weights"] = {"kind": "bitnet158", "input_norm": False, "scale": "row"}
    table["attention"]["sub_norm"], table["ffn"]["sub_norm"] = sub, sub
    return recipe_from_dict(data, source=recipe.source), state


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
