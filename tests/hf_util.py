"""Tiny random transformers models and the parity checks the interop tests share."""

from __future__ import annotations

import math

import torch

transformers = __import__("pytest").importorskip("transformers")

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Weights of unit-scale activations (init_std 0.02 would make every logit ~0 and the test blind)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
        elif "norm" in name:
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(0.3 * torch.randn(p.shape, generator=g))


def tiny_hf(config_cls, folder, seed: int = 0, **overrides):
    """A random tiny transformers model saved to `folder`; returns it (eval mode, float32)."""
    cfg = config_cls(**{**TINY, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    randomize(model, seed)
    model.save_pretrained(folder)
    return model


@torch.no_grad()
def assert_same_function(zoo_model, hf_model, vocab: int, seq: int = 11, new: int = 4, tol: float = 1e-4) -> None:
    """Same logits on random tokens, and the KV-cached steps equal the full forward of transformers."""
    zoo_model.eval()
    idx = torch.randint(0, vocab, (2, seq))
    ref = hf_model(idx).logits
    got = zoo_model(idx).logits
    assert got.shape == ref.shape
    err = (got - ref).abs().max().item()
    assert err <= tol, f"max |logits - transformers| = {err:.3g}"
    steps = torch.randint(0, vocab, (2, new))
    full = hf_model(torch.cat([idx, steps], 1)).logits
    cache = zoo_model.new_cache(2)
    logits = [zoo_model(idx, cache=cache).logits]
    for i in range(new):
        logits.append(zoo_model(steps[:, i:i + 1], cache=cache, start=seq + i).logits)
    cached = torch.cat(logits, 1)
    err = (cached - full).abs().max().item()
    assert err <= tol, f"KV-cached steps: max |logits - transformers| = {err:.3g}"
