"""BitNet b1.58 (transformers `bitnet`): ReLU², SubLN norms; quantized folders -> frozen bitnet158."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from zoo.io.arch.llama import Llama, shapes
from zoo.io.hf import HFConfig, Rule, gather
from zoo.kernels.ternary import pack_ternary


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
                scale = get(name + "_scale").float().reshape(())
                cache[name] = (t, 1.0 / scale if q["linear_class"] == "bitlinear" else scale)
        return cache[name]

    def source(name: str) -> torch.Tensor:
        if name.endswith("_scale") and name[: -len("_scale")] in projections:
            t, beta = weight(name[: -len("_scale")])
            return beta.expand(t.shape[0], 1)
        return weight(name)[0] if name in projections else get(name)

    return source


class BitNet(Llama):
    """BitNet b1.58: LLaMA layout with ReLU² and SubLN norms before o and down; RoPE base 500000."""

    theta = 5e5
    gguf = None
    config = None  # import-only: zoo does not write this layout

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
