"""BitNet b1.58 weights in the forms the exported formats store: transformers' packed rows, W̃·β
matrices split back into W̃ and β, and a zoo BitNet rewritten in the SubLN form that transformers'
and llama.cpp's BitNet share (used by zoo.io.hf, zoo.io.gguf and zoo.io.arch.bitnet)."""

from __future__ import annotations

import torch

from zoo.blocks.bitnet import BitLinear
from zoo.errors import CheckpointError
from zoo.recipe.recipe import recipe_from_dict


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
