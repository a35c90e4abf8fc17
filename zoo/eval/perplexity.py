"""Validation loss / perplexity and decode speed of a model."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterable

import torch


def autocast(precision: str, device: torch.device | str):
    """bf16 autocast for the model's `device` (its type: cpu, cuda) for precision 'bf16', else nothing."""
    if precision == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def eval_loss(model, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], precision: str = "fp32") -> float:
    """Mean cross-entropy (nats per token) over `batches` of (inputs, targets)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    try:
        for x, y in batches:
            with autocast(precision, device):
                loss = model(x.to(device), y.to(device)).loss
            total += float(loss) * y.numel()
            count += y.numel()
    finally:
        model.train(was_training)
    return total / max(count, 1)


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 700.0))


@torch.no_grad()
def decode_tokens_per_s(model, prompt: torch.Tensor, new_tokens: int = 32) -> float:
    """Tokens per second when sampling `new_tokens` after `prompt` [1, T] with the KV cache (greedy), on the
    decode engine with its layers eager: a few dozen tokens would not pay back compiling the layer step."""
    was_training = model.training
    model.eval()
    n = min(new_tokens, model.config.max_seq_len - prompt.shape[1])
    try:
        start = time.perf_counter()
        done = sum(1 for _ in model.generate(prompt.to(model.embed.weight.device), n, temperature=0, compile=False))
        return done / max(time.perf_counter() - start, 1e-9)
    finally:
        model.train(was_training)
