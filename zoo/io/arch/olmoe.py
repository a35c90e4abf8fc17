"""OLMoE (transformers `olmoe`, GGUF `olmoe`): MoE with RMSNorms over the whole q and k projections."""

from __future__ import annotations

from typing import Any

from zoo.blocks.ffn import default_hidden
from zoo.errors import CheckpointError
from zoo.io.arch import GGUFLayout
from zoo.io.arch.llama import GGUF_KEYS, Llama, shapes
from zoo.io.arch.mixtral import (
    ATTENTION_TENSORS,
    MOE_KEYS,
    expert_rules,
    gguf_expert_tensors,
    gguf_moe_keys,
    moe_checks,
    moe_config,
    moe_table,
)
from zoo.io.hf import HFConfig, Rule


class Olmoe(Llama):
    """OLMoE: LLaMA biases, qk_norm attention, softmax top-k experts (clip_qkv refused)."""

    known = MOE_KEYS | {"num_experts", "clip_qkv"}
    exports = frozenset({"model.attention.qk_norm"})
    # llama.cpp's olmoe: NeoX RoPE (q/k not permuted), top-k gates not renormalised
    gguf = GGUFLayout(
        "olmoe", False,
        {**ATTENTION_TENSORS, **gguf_expert_tensors("mlp."),
         "model.layers.{i}.self_attn.q_norm.weight": "blk.{i}.attn_q_norm.weight",
         "model.layers.{i}.self_attn.k_norm.weight": "blk.{i}.attn_k_norm.weight"},
        GGUF_KEYS + gguf_moe_keys("num_experts"), experts=True,
        fixed=(("norm_topk_prob", False, "llama.cpp's olmoe does not renormalise the top-k gates"),))

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

    def config(self, m) -> dict[str, Any]:
        moe_checks("olmoe", m, renormalize=None)
        attn = m.attention.config
        if not attn.qk_norm:
            raise CheckpointError("model.attention.qk_norm: the olmoe layout needs q/k norms (qk_norm = true)")
        if attn.qkv_bias != attn.o_bias:
            raise CheckpointError("model.attention: the olmoe layout has one attention_bias for q/k/v and o")
        ffn = m.ffn.config
        return {"model_type": "olmoe", "architectures": ["OlmoeForCausalLM"], **moe_config(m),
                "attention_bias": attn.qkv_bias, "clip_qkv": None,
                "intermediate_size": ffn.expert.config.hidden or default_hidden(m.d_model),
                "num_experts": ffn.num_experts, "norm_topk_prob": ffn.router.config.renormalize}


def register(registry) -> None:
    registry.register("converter", "olmoe", Olmoe, Olmoe)
