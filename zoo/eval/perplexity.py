"""Validation loss / perplexity and decode speed of a model."""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Iterable

import torch

from zoo.model.decode import Decoder


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
def decode_ms(model, prompt: torch.Tensor, tokens: int = 32, compile: bool | None = None) -> dict:
    """Milliseconds per decoded token at batch 1: `model` (pass its inference form, frozen and prepared, as
    `zoo generate` runs it) on the decode engine, greedy after `prompt` [1, T]. A warm-up first (the prompt
    and 2 steps: the layer steps compile there; `compile` as the Decoder's, None: ZOO_COMPILE), then the
    prompt again and the median of `tokens` timed steps. With the figure: the steps timed, the prompt length,
    torch's CPU threads and whether the step was compiled."""
    was_training = model.training
    model.eval()
    n = max(1, min(tokens, model.config.max_seq_len - prompt.shape[1] - 1))
    prompt = prompt.to(model.embed.weight.device)
    dec = Decoder(model, 1, prompt.shape[1] + n + 1, compile)
    try:
        nxt = dec.prefill(prompt).argmax(-1, keepdim=True)
        for _ in range(2):
            nxt = dec.step(nxt).argmax(-1, keepdim=True)
        nxt, times = dec.prefill(prompt).argmax(-1, keepdim=True), []
        for _ in range(n):
            start = time.perf_counter()
            nxt = dec.step(nxt).argmax(-1, keepdim=True)
            times.append(time.perf_counter() - start)
    finally:
        model.train(was_training)
    return {"ms_per_token": statistics.median(times) * 1e3, "tokens": n, "prompt": prompt.shape[1],
            "threads": torch.get_num_threads(), "compiled": dec.compiled}
