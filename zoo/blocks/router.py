"""MoE routers: score every expert for every token (in fp32), keep the top_k.

A `router` factory is called as `factory(cfg, ctx, d_model, num_experts, top_k)` and returns a
module `x [T, D] -> Routing`. The router weight is a plain full-precision linear map: it is
not made by the projection factory, so BitNet weights and top-K input sparsity never touch it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from zoo.schema import param


@dataclass
class Routing:
    """The router's decision for T tokens (all fp32 except the indices)."""

    weights: torch.Tensor  # [T, k] gate of each chosen expert
    experts: torch.Tensor  # [T, k] int64 ids of the chosen experts
    probs: torch.Tensor  # [T, E] the distribution the load-balancing loss sees
    logits: torch.Tensor  # [T, E] raw scores (router z-loss)


class Router(nn.Module):
    """logits = x·Wᵀ in fp32 (jittered input in training); subclasses turn logits into a Routing."""

    def __init__(self, d_model: int, num_experts: int, top_k: int, renormalize: bool, jitter: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        nn.init.normal_(self.weight, std=0.02)
        self.top_k, self.renormalize, self.jitter = top_k, renormalize, jitter

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.training and self.jitter > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        return F.linear(x, self.weight.float())

    def choose(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k of `scores` [T, E]: their values (renormalised to sum 1 if asked) and ids."""
        weights, experts = torch.topk(scores, self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
        return weights, experts

    def extra_repr(self) -> str:
        e, d = self.weight.shape
        return f"{d}->{e}, top_k={self.top_k}, renormalize={self.renormalize}, jitter={self.jitter}"


@dataclass(frozen=True)
class SoftmaxTopKConfig:
    """softmax over all experts (fp32), then the top_k probabilities are the gates"""

    renormalize: bool = param(True, "rescale the k gates to sum to 1 (Mixtral: true; OLMoE, Qwen2-MoE: false)")
    jitter: float = param(0.0, "training only: multiply the router input by U(1-jitter, 1+jitter) (Switch)",
                          ge=0, lt=1)


class SoftmaxTopK(Router):
    def forward(self, x: torch.Tensor) -> Routing:
        logits = self.logits(x)
        probs = logits.softmax(-1)
        weights, experts = self.choose(probs)
        return Routing(weights, experts, probs, logits)


@dataclass(frozen=True)
class SigmoidTopKConfig:
    """independent sigmoid score per expert (fp32), the top_k scores are the gates (DeepSeek-V3 style)"""

    renormalize: bool = param(True, "rescale the k gates to sum to 1")
    jitter: float = param(0.0, "training only: multiply the router input by U(1-jitter, 1+jitter)", ge=0, lt=1)


class SigmoidTopK(Router):
    def forward(self, x: torch.Tensor) -> Routing:
        logits = self.logits(x)
        scores = logits.sigmoid()
        weights, experts = self.choose(scores)
        # the load-balancing loss sees the scores normalised per token
        return Routing(weights, experts, scores / scores.sum(-1, keepdim=True), logits)


def _factory(cls):
    def build(cfg, ctx, d_model: int, num_experts: int, top_k: int) -> Router:
        return cls(d_model, num_experts, top_k, cfg.renormalize, cfg.jitter)

    return build


def register(registry) -> None:
    registry.register("router", "softmax_topk", SoftmaxTopKConfig, _factory(SoftmaxTopK))
    registry.register("router", "sigmoid_topk", SigmoidTopKConfig, _factory(SigmoidTopK))
