"""Qwen2-MoE (transformers `qwen2_moe`, GGUF `qwen2moe`): MoE with a gated shared expert; some layers dense."""

from __future__ import annotations

from typing import Any

from zoo.blocks.ffn import default_hidden
from zoo.errors import CheckpointError
from zoo.io.arch import REQUIRED, GGUFLayout
from zoo.io.arch.llama import GGUF_KEYS, Llama, glu_rules, hf_activation, shapes
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

SHARED_TENSORS = {f"model.layers.{{i}}.mlp.shared_expert.{n}.weight": f"blk.{{i}}.ffn_{role}_shexp.weight"
                  for n, role in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down"))}


def sparse(cfg: HFConfig, i: int) -> bool:
    """transformers' rule for which Qwen2-MoE layers are MoE (the others are dense GLUs)."""
    return i not in (cfg.get("mlp_only_layers", []) or []) and int(cfg.need("num_experts")) > 0 \
        and (i + 1) % int(cfg.get("decoder_sparse_step", 1)) == 0


class Qwen2Moe(Llama):
    """Qwen2-MoE: q/k/v biases (qkv_bias), softmax top-k experts plus one sigmoid-gated shared expert."""

    known = MOE_KEYS | {"num_experts", "moe_intermediate_size", "shared_expert_intermediate_size",
                        "decoder_sparse_step", "mlp_only_layers"}
    exports = frozenset({"model.layers"})
    # llama.cpp's qwen2moe: every layer MoE, top-k gates not renormalised, the shared gate stored as [d]
    gguf = GGUFLayout(
        "qwen2moe", False,
        {**ATTENTION_TENSORS, **gguf_expert_tensors("mlp."), **SHARED_TENSORS,
         "model.layers.{i}.mlp.shared_expert_gate.weight": "blk.{i}.ffn_gate_inp_shexp.weight"},
        GGUF_KEYS + gguf_moe_keys("num_experts") + (
            ("expert_feed_forward_length", "moe_intermediate_size", int, REQUIRED),
            ("expert_shared_feed_forward_length", "shared_expert_intermediate_size", int, REQUIRED)),
        experts=True,
        fixed=(("norm_topk_prob", False, "llama.cpp's qwen2moe does not renormalise the top-k gates"),
               ("mlp_only_layers", [], "llama.cpp's qwen2moe has no dense layers"),
               ("decoder_sparse_step", 1, "llama.cpp's qwen2moe has no dense layers")),
        flat=("model.layers.{i}.mlp.shared_expert_gate.weight",))

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

    def config(self, m) -> dict[str, Any]:
        moe_checks("qwen2_moe", m, renormalize=None, shared=1)
        ffn = m.ffn.config
        attn = m.attention.config
        if attn.o_bias:
            raise CheckpointError("model.attention.o_bias: the qwen2_moe layout has q/k/v biases only")
        dense, hidden = [], None
        for n, pattern in enumerate(m.layers):
            fields = {k for k in ("attention", "norm", "weights", "sparsity", "position") if getattr(pattern, k)}
            glu = pattern.ffn
            if fields or glu is None or glu.kind != "glu" or glu.config.bias or glu.config.act_sparsity \
                    or glu.config.sub_norm or pattern.every != 1:
                raise CheckpointError(f"model.layers[{n}]: the qwen2_moe layout allows only dense GLU layers "
                                      "(an ffn of kind 'glu' without bias, sub_norm or act_sparsity)")
            h = glu.config.hidden or default_hidden(m.d_model)
            if hidden not in (None, h) or hf_activation(glu.config.activation) != \
                    hf_activation(ffn.expert.config.activation):
                raise CheckpointError(f"model.layers[{n}].ffn: the qwen2_moe layout has one dense width and "
                                      "the experts' activation for all dense layers")
            hidden = h
            dense += pattern.layers(m.n_layers)
        return {"model_type": "qwen2_moe", "architectures": ["Qwen2MoeForCausalLM"], **moe_config(m),
                "qkv_bias": attn.qkv_bias, "intermediate_size": hidden or ffn.shared_hidden or m.d_model,
                "moe_intermediate_size": ffn.expert.config.hidden or default_hidden(m.d_model),
                "shared_expert_intermediate_size": ffn.shared_hidden or ffn.expert.config.hidden
                or default_hidden(m.d_model),
                "num_experts": ffn.num_experts, "norm_topk_prob": ffn.router.config.renormalize,
                "decoder_sparse_step": 1, "mlp_only_layers": sorted(set(dense)), "use_sliding_window": False,
                "sliding_window": None}


def register(registry) -> None:
    registry.register("converter", "qwen2_moe", Qwen2Moe, Qwen2Moe)
