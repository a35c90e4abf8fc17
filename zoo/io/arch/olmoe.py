"""OLMoE (transformers `olmoe`): MoE with RMSNorms over the whole q and k projections."""

from __future__ import annotations

from typing import Any

from zoo.io.arch.llama import Llama, shapes
from zoo.io.arch.mixtral import MOE_KEYS, expert_rules, moe_table
from zoo.io.hf import HFConfig, Rule


class Olmoe(Llama):
    """OLMoE: LLaMA biases, qk_norm attention, softmax top-k experts (clip_qkv refused)."""

    known = MOE_KEYS | {"num_experts", "clip_qkv"}
    gguf = None
    config = None  # import-only: zoo does not write this layout

    def recipe(self, cfg: HFConfig) -> dict[str, Any]:
        cfg.refuse("clip_qkv", lambda v: False, "clamping q/k/v is not implemented")
        model = super().recipe(cfg)
        model["attention"]["qk_norm"] = True
        model["ffn"] = moe_table(cfg, "num_experts", int(cfg.need("intermediate_size")),
                                 renormalize=bool(cfg.get("norm_topk_prob", False)))
        return model

    def rules(self, cfg: HFConfig) -> list[Rule]:
        _, _, _, hidden = shapes(cfg)
        d, e = int(cfg.need("hidden_size")), int(cfg.need("num_experts"))
        return self.decoder_rules(cfg, lambda i: expert_rules(i, f"model.layers.{i}.mlp.", e, hidden, d),
                                  qk_norm=True)


def register(registry) -> None:
    registry.register("converter", "olmoe", Olmoe, Olmoe)
