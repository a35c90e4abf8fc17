"""Causal multi-head / grouped-query attention with a KV cache."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from zoo import contracts
from zoo.kernels import cpu
from zoo.schema import BlockSpec, param, slot_field


@dataclass(frozen=True)
class AttentionConfig:
    """causal self-attention; grouped-query when model.n_kv_heads < model.n_heads"""

    qkv_bias: bool = param(False, "bias on the q/k/v projections (Qwen2)")
    o_bias: bool = param(False, "bias on the output projection")
    qk_norm: bool = param(False, "the layer's norm over the whole q and k projections, before RoPE (OLMoE)")
    sub_norm: BlockSpec | None = slot_field("norm", None, "norm of the output projection's input (SubLN, BitNet)")


class Attention(nn.Module):
    def __init__(self, cfg: AttentionConfig, ctx: contracts.BuildContext):
        super().__init__()
        m = ctx.model
        self.n_heads, self.n_kv, self.hd = m.n_heads, m.kv_heads, m.head_size
        self.qkv = ctx.projection("qkv", m.d_model, (m.n_heads + 2 * m.kv_heads) * m.head_size, cfg.qkv_bias)
        self.sub_norm = ctx.build_optional(cfg.sub_norm, m.n_heads * m.head_size)
        self.o = ctx.projection("o", m.n_heads * m.head_size, m.d_model, cfg.o_bias)
        self.rope = ctx.build(ctx.block("position"))
        if cfg.qk_norm:
            self.q_norm = ctx.build(ctx.block("norm"), m.n_heads * m.head_size)
            self.k_norm = ctx.build(ctx.block("norm"), m.kv_heads * m.head_size)
        self.qk_norm = cfg.qk_norm

    def forward(self, x: torch.Tensor, start: int = 0, cache=None) -> torch.Tensor:
        t = x.shape[1]
        q, k, v = self.qkv.split(x, (self.n_heads * self.hd, self.n_kv * self.hd, self.n_kv * self.hd))
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (heads(z, self.hd) for z in (q, k, v))
        q, k = self.rope(q, k, start)
        if cache is not None:
            k, v = cache.update(k, v, start)
        if t == 1 and cpu.attends(q, k, v):  # a decode step on CPU: one compiled call, the cache read in place
            y = cpu.decode_attention(q, k, v).to(q.dtype)
        else:
            y = attend(q, k, v, start, gqa=self.n_kv != self.n_heads)
        return self.o(self.sub_norm(y.transpose(1, 2).flatten(2)))  # b h t d -> b t (h d)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, gqa: bool) -> torch.Tensor:
    """torch's SDPA for queries at start..start+t-1 over keys 0..start+t-1."""
    t, dtype = q.shape[2], q.dtype
    if q.device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
        # torch's CPU attention in half precision runs 2.5-5x slower than in fp32 (decode, 88-600 keys,
        # measured): fp32 inside, the result rounded back
        q, k, v = q.float(), k.float(), v.float()
    if k.shape[2] == t or t == 1:  # t == 1: the newest query sees every cached key, no mask needed
        y = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1, enable_gqa=gqa)
    else:
        mask = torch.arange(k.shape[2], device=q.device) <= torch.arange(start, start + t, device=q.device)[:, None]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    return y.to(dtype)


def heads(z: torch.Tensor, d: int) -> torch.Tensor:
    """b t (h d) -> b h t d (a view: einops' rearrange costs ~4x the time at decode, 4 calls a layer)"""
    return z.unflatten(-1, (-1, d)).transpose(1, 2)


def register(registry) -> None:
    registry.register("attention", "mha", AttentionConfig, Attention)
