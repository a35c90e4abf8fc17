"""TEAL-style calibration: the magnitude threshold of each `threshold` sparsity block, set so that a
fraction `keep` of its input entries on calibration text lies above it.

All thresholds come from one pass of the dense model (every threshold block passes everything
while calibrating), from a random sample of |x| at each block (SAMPLE entries per forward): t is
the (1 - keep) quantile of that sample.
"""

from __future__ import annotations

import torch

from zoo.blocks.threshold import Threshold
from zoo.errors import ZooError
from zoo.eval.perplexity import autocast

SAMPLE = 1 << 16  # |x| entries sampled per threshold block and forward


@torch.no_grad()
def calibrate(model, batches: list[tuple[torch.Tensor, torch.Tensor]], precision: str = "fp32",
              seed: int = 0) -> dict[str, float]:
    """Set every Threshold block's threshold from `batches` of (inputs, targets); returns {module: t}."""
    sites = {name: m for name, m in model.named_modules() if isinstance(m, Threshold)}
    if not sites:
        raise ZooError("calibrate: the model has no projection with sparsity kind 'threshold'")
    g = torch.Generator().manual_seed(seed)
    samples: dict[str, list[torch.Tensor]] = {name: [] for name in sites}

    def hook(name):
        def record(module, args):
            a = args[0].detach().abs().flatten().float().cpu()
            pick = torch.randperm(a.numel(), generator=g)[:SAMPLE] if a.numel() > SAMPLE else slice(None)
            samples[name].append(a[pick])
        return record

    hooks = [m.register_forward_pre_hook(hook(name)) for name, m in sites.items()]
    for m in sites.values():
        m.threshold.fill_(-float("inf"))  # dense while calibrating
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for x, _ in batches:
            with autocast(precision, device):
                model(x.to(device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    out = {}
    for name, m in sites.items():
        t = torch.quantile(torch.cat(samples[name]), 1 - m.keep_fraction).item()
        m.threshold.fill_(t)
        out[name] = t
    return out
