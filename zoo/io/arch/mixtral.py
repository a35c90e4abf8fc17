"""Mixtral (transformers `mixtral`), and the mixture-of-experts pieces qwen2_moe and olmoe share."""

from __future__ import annotations

from typing import Any

from zoo.blocks.ffn import default_hidden
from zoo.errors import CheckpointError
from zoo.io.arch import REQUIRED, GGUFLayout
from zoo.io.arch.llama import GGUF_KEYS, GGUF_TENSORS, Llama, activation, common_config, hf_activation, shapes
from zoo.io.hf import HFConfig, Rule, only_defaults

MOE_KEYS = frozenset({"num_experts_per_tok", "norm_topk_prob"})

# llama.cpp's attention tensors (no dense FFN), and its stacked-expert names for `prefix` + experts.{e}.
ATTENTION_TENSORS = {hf: g for hf, g in GGUF_TENSORS.items() if ".mlp." not in hf}


def gguf_expert_tensors(prefix: str, names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"),
                        ) -> dict[str, str]:
    """Router and experts of a layer whose transformers tensors live under model.layers.{i}.<prefix>."""
    p = f"model.layers.{{i}}.{prefix}"
    return {p + "gate.weight": "blk.{i}.ffn_gate_inp.weight",
            **{f"{p}experts.{{e}}.{n}.weight": f"blk.{{i}}.ffn_{role}_exps.weight"
               for n, role in zip(names, ("gate", "up", "down"))}}


def gguf_moe_keys(experts_key: str) -> tuple[tuple[str, str, type, object], ...]:
    return (("expert_count", experts_key, int, REQUIRED), ("expert_used_count", "num_experts_per_tok", int, REQUIRED))


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


class Mixtral(Llama):
    """Mixtral: LLaMA without biases, MoE FFN (renormalised softmax top-k, GLU experts w1/w3/w2)."""

    theta = 1e6
    known = MOE_KEYS | {"num_local_experts"}
    # llama.cpp stores Mixtral as `llama` with experts (renormalised top-k gates, as Mixtral)
    gguf = GGUFLayout("llama", True,
                      {**ATTENTION_TENSORS, **gguf_expert_tensors("block_sparse_moe.", ("w1", "w3", "w2"))},
                      GGUF_KEYS + gguf_moe_keys("num_local_experts"), experts=True)

    def biases(self, cfg: HFConfig) -> dict[str, bool]:
        return {"qkv_bias": False, "o_bias": False, "mlp_bias": False}

    def recipe(self, cfg: HFConfig) -> dict[str, Any]:
        model = super().recipe(cfg)
        model["ffn"] = moe_table(cfg, "num_local_experts", int(cfg.need("intermediate_size")), renormalize=True)
        return model

    def rules(self, cfg: HFConfig) -> list[Rule]:
        _, _, _, hidden = shapes(cfg)
        d, e = int(cfg.need("hidden_size")), int(cfg.need("num_local_experts"))
        return self.decoder_rules(cfg, lambda i: expert_rules(i, f"model.layers.{i}.block_sparse_moe.", e, hidden,
                                                              d, ("w1", "w3", "w2")))

    def config(self, m) -> dict[str, Any]:
        moe_checks("mixtral", m, renormalize=True)
        if m.attention.config.qkv_bias or m.attention.config.o_bias:
            raise CheckpointError("model.attention: the mixtral layout has no biases")
        ffn = m.ffn.config
        return {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], **moe_config(m),
                "intermediate_size": ffn.expert.config.hidden or default_hidden(m.d_model),
                "num_local_experts": ffn.num_experts, "sliding_window": None}


def moe_checks(layout: str, m, renormalize: bool | None, shared: int = 0) -> None:
    """Refuse, by key path, a zoo MoE FFN that the `layout` cannot express (renormalize None: either;
    `shared`: the number of shared experts, each sigmoid-gated when there is one)."""
    if m.ffn.kind != "moe":
        raise CheckpointError(f"model.ffn.kind: the {layout} layout needs a 'moe' FFN, not {m.ffn.kind!r}")
    ffn = m.ffn.config
    expert, router = ffn.expert, ffn.router
    only_defaults(expert.config, {"hidden", "activation"}, "model.ffn.expert")
    checks = [("model.ffn.expert.kind", expert.kind == "glu", "GLU experts"),
              ("model.ffn.expert.bias", not getattr(expert.config, "bias", False), "experts without biases"),
              ("model.ffn.router.kind", router.kind == "softmax_topk", "the softmax_topk router"),
              ("model.ffn.router.renormalize", renormalize in (None, getattr(router.config, "renormalize", None)),
               f"renormalize = {str(renormalize).lower()}"),
              ("model.ffn.shared_experts", ffn.shared_experts == shared, f"{shared} shared experts"),
              ("model.ffn.shared_gate", ffn.shared_gate == bool(shared), f"shared_gate = {str(bool(shared)).lower()}"),
              ("model.ffn.capacity_factor", ffn.capacity_factor is None, "dropless routing")]
    for key, ok, need in checks:
        if not ok:
            raise CheckpointError(f"{key}: the {layout} layout needs {need}")


def moe_config(m) -> dict[str, Any]:
    """config.json keys shared by the MoE layouts."""
    ffn = m.ffn.config
    return {**common_config(m), "hidden_act": hf_activation(ffn.expert.config.activation),
            "num_experts_per_tok": ffn.top_k, "router_aux_loss_coef": ffn.aux_loss,
            "router_jitter_noise": ffn.router.config.jitter}


def register(registry) -> None:
    registry.register("converter", "mixtral", Mixtral, Mixtral)
