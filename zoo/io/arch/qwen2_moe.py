"""Qwen2-MoE (transformers `qwen2_moe`): MoE with a gated shared expert; some layers dense."""

from __future__ import annotations

from typing import Any

from zoo.io.arch.llama import Llama, glu_rules, shapes
from zoo.io.arch.mixtral import MOE_KEYS, expert_rules, moe_table
from zoo.io.hf import HFConfig, Rule


def sparse(cfg: HFConfig, i: int) -> bool:
    """transformers' rule for which Qwen2-MoE layers are MoE (the others are dense GLUs)."""
    return i not in (cfg.get("mlp_only_layers", []) or []) and int(cfg.need("num_experts")) > 0 \
        and (i + 1) % int(cfg.get("decoder_sparse_step", 1)) == 0


class Qwen2Moe(Llama):
    """Qwen2-MoE: q/k/v biases (qkv_bias), softmax top-k experts plus one sigmoid-gated shared expert."""

    known = MOE_KEYS | {"num_experts", "moe_intermediate_size", "shared_expert_intermediate_size",
                        "decoder_sparse_step", "mlp_only_layers"}
    gguf = None
    config = None  # import-only: zoo does not write this layout

    def biases(self, cfg: HFConfig) -> dict[str, bool]:
        return {"qkv_bias": bool(cfg.get("qkv_bias", True)), "o_bias": False, "mlp_bias": False}

    def recipe(self, cfg: HFConfig) -> dict[str, Any]:
        model = super().recipe(cfg)
        ffn = moe_table(cfg, "num_experts", int(cfg.need("moe_intermediate_size")),
                        renormalize=bool(cfg.get("norm_topk_prob", False)))
        ffn.update(shared_experts=1, shared_hidden=int(cfg.need("shared_expert_intermediate_size")),
                   shared_gate=True)
        dense = model["ffn"]
        model["ffn"] = ffn
        model["layers"] = [{"range": str(i), "ffn": dense} for i in range(model["n_layers"]) if not sparse(cfg, i)]
        return model

    def rules(self, cfg: HFConfig) -> list[Rule]:
        _, _, _, hidden = shapes(cfg)
        d = int(cfg.need("hidden_size"))
        moe_hidden, shared = int(cfg.need("moe_intermediate_size")), int(cfg.need("shared_expert_intermediate_size"))

        def ffn(i: int) -> list[Rule]:
            p = f"model.layers.{i}.mlp."
            if not sparse(cfg, i):
                return glu_rules(p, f"blocks.{i}.ffn", hidden, d, False)
            return (expert_rules(i, p, int(cfg.need("num_experts")), moe_hidden, d)
                    + glu_rules(p + "shared_expert.", f"blocks.{i}.ffn.shared", shared, d, False)
                    + [Rule(f"blocks.{i}.ffn.shared_gate.weight", ((p + "shared_expert_gate.weight", 1),))])

        return self.decoder_rules(cfg, ffn)


def register(registry) -> None:
    registry.register("converter", "qwen2_moe", Qwen2Moe, Qwen2Moe)
