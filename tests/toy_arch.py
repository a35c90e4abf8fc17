"""A test plugin adding a made-up architecture, `toyformer`, to the `converter` slot.

Its config.json and tensor names share nothing with transformers' LLaMA: the converter alone
says how they map to zoo, in both directions (import by `recipe` + `rules`, export by `config`).
"""

from __future__ import annotations

from typing import Any

import zoo
from zoo.io.arch import Converter
from zoo.io.hf import HFConfig, Rule


class Toyformer(Converter):
    """Toyformer: a made-up pre-norm decoder (tied embeddings, RoPE, SiLU GLU, no biases)."""

    known = frozenset({"width", "depth", "heads", "mlp_width", "vocab", "context", "norm_eps", "rope_base"})

    def recipe(self, cfg: HFConfig) -> dict[str, Any]:
        return {
            "vocab_size": int(cfg.need("vocab")), "d_model": int(cfg.need("width")),
            "n_layers": int(cfg.need("depth")), "n_heads": int(cfg.need("heads")),
            "max_seq_len": int(cfg.need("context")), "tie_embeddings": True,
            "norm": {"kind": "rmsnorm", "eps": float(cfg.need("norm_eps"))},
            "position": {"kind": "rope", "theta": float(cfg.need("rope_base"))},
            "ffn": {"kind": "glu", "hidden": int(cfg.need("mlp_width")), "activation": "silu"},
        }

    def rules(self, cfg: HFConfig) -> list[Rule]:
        d, hidden = int(cfg.need("width")), int(cfg.need("mlp_width"))
        rules = [Rule("embed.weight", (("tok.weight", int(cfg.need("vocab"))),)),
                 Rule("norm.weight", (("ln_out.weight", d),))]
        for i in range(int(cfg.need("depth"))):
            h, z = f"h.{i}.", f"blocks.{i}."
            rules += [Rule(z + "attn_norm.weight", ((h + "ln1.weight", d),)),
                      Rule(z + "attn.qkv.linear.weight", ((h + "wq.weight", d), (h + "wk.weight", d),
                                                          (h + "wv.weight", d))),
                      Rule(z + "attn.o.linear.weight", ((h + "wo.weight", d),)),
                      Rule(z + "ffn_norm.weight", ((h + "ln2.weight", d),)),
                      Rule(z + "ffn.up_gate.linear.weight", ((h + "w_gate.weight", hidden),
                                                             (h + "w_up.weight", hidden))),
                      Rule(z + "ffn.down.linear.weight", ((h + "w_down.weight", d),))]
        return rules

    def config(self, m) -> dict[str, Any]:
        return {"model_type": "toyformer", "width": m.d_model, "depth": m.n_layers, "heads": m.n_heads,
                "mlp_width": m.ffn.config.hidden, "vocab": m.vocab_size, "context": m.max_seq_len,
                "norm_eps": m.norm.config.eps, "rope_base": m.position.config.theta}


@zoo.hookimpl
def zoo_register(registry) -> None:
    registry.register("converter", "toyformer", Toyformer, Toyformer)
