"""The decoder: embedding -> blocks (attention, FFN; pre-norm residuals) -> norm -> LM head."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from zoo.blocks.weights import TiedTransposedHead, TransposedLinear, transposed_pays
from zoo.contracts import FFN, Preparable
from zoo.kernels import cpu
from zoo.kernels.dispatch import choose
from zoo.model.config import LAYER_SLOTS, ModelConfig
from zoo.model.context import BuildContext
from zoo.model.decode import Decoder, KVCache, sample
from zoo.model.projection import Projection


@dataclass
class ModelOutput:
    """logits; `loss` (cross-entropy) when targets were given; MoE and other auxiliary losses."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def total_loss(self) -> torch.Tensor:
        """Cross-entropy plus every auxiliary loss: what a training step minimises."""
        assert self.loss is not None, "total_loss needs targets"
        return self.loss + sum(self.aux_losses.values(), torch.zeros((), device=self.loss.device))


class Block(nn.Module):
    """x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, ctx: BuildContext):
        super().__init__()
        d = ctx.model.d_model
        self.attn_norm = ctx.build(ctx.block("norm"), d)
        self.attn = ctx.build(ctx.block("attention"))
        self.ffn_norm = ctx.build(ctx.block("norm"), d)
        self.ffn = ctx.build(ctx.block("ffn"), d)

    def forward(self, x: torch.Tensor, start: int = 0, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), start=start, cache=cache)
        return x + self.ffn(self.ffn_norm(x))


class Transformer(nn.Module, Preparable):
    """A decoder-only language model assembled from the recipe's registered blocks."""

    TRANSFORMS = ("freeze",)  # the only methods a checkpoint's meta.json may ask zoo.load to replay

    def __init__(self, cfg: ModelConfig, registry, source: str = ""):
        super().__init__()
        self.config = cfg
        ctx = BuildContext(cfg, registry, source=source)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(
            Block(BuildContext(cfg, registry, i, cfg.layer(i), source=source)) for i in range(cfg.n_layers)
        )
        self.norm = ctx.build(cfg.norm, cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        self._aux_modules = [m for m in self.modules() if isinstance(m, FFN)]
        self.zoo_transforms: list[str] = []  # no-argument methods zoo.load redoes after building
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) weights; those of projections writing to the residual stream (their role
        declares it: `o`, `down`, ...) scaled by 1/sqrt(2·n_layers)."""
        std = self.config.init_std
        residual = [m for m in self.modules() if isinstance(m, Projection) and m.residual]
        deep = {id(p) for m in residual for p in m.linear.parameters()}
        for p in self.parameters():
            if p.is_meta or p.dim() - getattr(p, "expert_dims", 0) < 2:
                continue
            nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.config.n_layers) if id(p) in deep else std)

    @torch.no_grad()
    def freeze(self) -> Transformer:
        """Switch every weights block that has a frozen storage to it (BitNet: packed ternary weights).

        Irreversible (latent weights are dropped); recorded in `zoo_transforms` so `zoo.load` redoes it.
        """
        for m in list(self.modules()):
            if isinstance(m, Projection):
                m.freeze()
        if "freeze" not in self.zoo_transforms:
            self.zoo_transforms.append("freeze")
        return self

    @torch.no_grad()
    def prepare_inference(self, dtype: torch.dtype, impl: str = "auto") -> None:
        """The LM head is one more dense GEMV per token: on CPU (fp32, or bf16 with the compiled kernels) the
        Wt layout (see TransposedLinear); a head tied to the embedding keeps the tie and decodes from a
        transposed copy (TiedTransposedHead) where zoo's compiled GEMV is built."""
        if not isinstance(self.head, nn.Linear) or not transposed_pays(self.head.weight, impl):
            return
        if self.head.weight is not self.embed.weight:
            self.head = TransposedLinear(self.head.weight, self.head.bias, impl)
        elif choose(impl, self.head.weight.device, cpu_kernel=cpu.usable(self.head.weight)) == "cpu":
            self.head = TiedTransposedHead(self.head)

    def new_cache(self, batch: int, device=None, dtype=None) -> list[KVCache]:
        c = self.config
        p = self.embed.weight
        return [KVCache(batch, c.kv_heads, c.max_seq_len, c.head_size, device or p.device, dtype or p.dtype)
                for _ in self.blocks]

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: list[KVCache] | None = None, start: int = 0) -> ModelOutput:
        """idx [B, T] token ids; with `cache`, they sit at positions start..start+T-1."""
        if start + idx.shape[1] > self.config.max_seq_len:
            raise ValueError(f"sequence of {start + idx.shape[1]} tokens exceeds max_seq_len={self.config.max_seq_len}")
        x = self.embed(idx)
        for i, block in enumerate(self.blocks):
            x = block(x, start=start, cache=None if cache is None else cache[i])
        logits = self.head(self.norm(x))
        loss = None
        if targets is not None:
            logits32 = logits.to(torch.promote_types(logits.dtype, torch.float32))
            loss = F.cross_entropy(logits32.flatten(0, 1), targets.flatten(), ignore_index=-1)
        aux: dict[str, torch.Tensor] = {}
        for m in self._aux_modules:
            for k, v in m.aux_losses.items():
                aux[k] = aux[k] + v if k in aux else v
        return ModelOutput(logits, loss, aux)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, generator=None, compile: bool | None = None):
        """Sample continuations with the KV cache; yields one [B, 1] tensor of ids per step.

        Runs on the decode engine (zoo.model.decode.Decoder): the prompt batched, each new token
        through the compiled steps over runs of layers (`compile=False`: the eager layers;
        None: ZOO_COMPILE, default on)."""
        max_len = min(idx.shape[1] + max_new_tokens, self.config.max_seq_len)
        yield from Decoder(self, idx.shape[0], max_len, compile).generate(
            idx, max_new_tokens, temperature, top_k, top_p, generator)


__all__ = ["LAYER_SLOTS", "Block", "KVCache", "ModelOutput", "Transformer", "sample"]
