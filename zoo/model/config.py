"""The `[model]` section: shapes, the blocks of each slot, and per-layer patterns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from zoo.schema import BlockSpec, Invalid, param, slot_field

# Slots that a `[[model.layers]]` entry may override for some layers.
LAYER_SLOTS = ("attention", "norm", "ffn", "weights", "sparsity", "position")
# Parameter dtypes a recipe may name, and their torch types.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class LayerPattern:
    """Blocks for a subset of layers; any slot left out keeps the model-wide block."""

    range: str = param(doc='layers it applies to: "3", "0-5", "4-" (to the end) or "all"')
    every: int = param(1, "take every Nth layer of the range (2 = every other layer)", ge=1)
    attention: BlockSpec | None = slot_field("attention", None, "attention block for these layers")
    norm: BlockSpec | None = slot_field("norm", None, "norm for these layers")
    ffn: BlockSpec | None = slot_field("ffn", None, "FFN block for these layers")
    weights: BlockSpec | None = slot_field("weights", None, "projection weights for these layers")
    sparsity: BlockSpec | None = slot_field("sparsity", None, "projection-input sparsity for these layers")
    position: BlockSpec | None = slot_field("position", None, "positional encoding for these layers")

    def layers(self, n_layers: int) -> list[int]:
        r = self.range.strip()
        if r == "all":
            lo, hi = 0, n_layers - 1
        else:
            a, dash, b = r.partition("-")
            try:
                lo = int(a)
                hi = (int(b) if b.strip() else n_layers - 1) if dash else lo
            except ValueError:
                raise Invalid("range", f'invalid range {self.range!r}; use "3", "0-5", "4-" or "all"') from None
        if not 0 <= lo <= hi < n_layers:
            raise Invalid("range", f"range {self.range!r} is outside layers 0-{n_layers - 1}")
        return list(range(lo, hi + 1, self.every))


@dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer: shapes plus one registered block per slot."""

    vocab_size: int = param(256, "number of token ids", ge=1, le=1 << 22)
    d_model: int = param(256, "residual stream width", ge=1, le=1 << 16)
    n_layers: int = param(4, "number of transformer blocks", ge=1, le=1024)
    n_heads: int = param(4, "attention (query) heads", ge=1, le=1024)
    n_kv_heads: int | None = param(None, "key/value heads for grouped-query attention (default n_heads)",
                                   ge=1, le=1024)
    head_dim: int | None = param(None, "width of one head (default d_model / n_heads)", ge=1, le=1 << 12)
    max_seq_len: int = param(256, "longest sequence (KV cache size)", ge=1, le=1 << 20)
    tie_embeddings: bool = param(True, "share the token embedding and the LM head weight")
    dtype: Literal["float32", "bfloat16", "float16"] = param("float32", "parameter dtype")
    init_std: float = param(0.02, "std of the normal init of weights", gt=0, le=1)
    attention: BlockSpec = slot_field("attention", {"kind": "mha"}, "attention block")
    position: BlockSpec = slot_field("position", {"kind": "rope"}, "positional encoding")
    norm: BlockSpec = slot_field("norm", {"kind": "rmsnorm"}, "norm before attention, FFN and head")
    ffn: BlockSpec = slot_field("ffn", {"kind": "glu"}, "feed-forward block")
    weights: BlockSpec = slot_field("weights", {"kind": "fp"}, "weights of every projection (per role)")
    sparsity: BlockSpec = slot_field("sparsity", {"kind": "none"}, "input sparsity of every projection (per role)")
    layers: tuple[LayerPattern, ...] = param((), "per-layer overrides, applied in order (later wins)")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    def check(self) -> None:
        if self.head_dim is None and self.d_model % self.n_heads:
            raise Invalid("n_heads", f"n_heads={self.n_heads} must divide d_model={self.d_model} "
                                     "(or set head_dim)")
        if self.n_heads % self.kv_heads:
            raise Invalid("n_kv_heads", f"n_kv_heads={self.kv_heads} must divide n_heads={self.n_heads}")
        for i, pattern in enumerate(self.layers):
            try:
                pattern.layers(self.n_layers)
            except Invalid as err:
                raise Invalid(f"layers[{i}].{err.key}", err.message) from None

    def layer(self, i: int) -> dict[str, Any]:
        """The block of each slot in layer `i`, after the layer patterns."""
        out = {s: getattr(self, s) for s in LAYER_SLOTS}
        for pattern in self.layers:
            if i in pattern.layers(self.n_layers):
                out.update({s: getattr(pattern, s) for s in LAYER_SLOTS if getattr(pattern, s) is not None})
        return out
