"""TEAL-style calibration: the magnitude threshold of each `threshold` sparsity block, set so that a
fraction `keep` of its input entries on calibration text lies above it.

All thresholds come from one pass of the dense model (every threshold block passes everything
while calibrating). Each block counts its |x| into a fixed histogram of BINS log-spaced bins, added
to in place, so calibration holds 256 KiB per block however many batches it reads; t is the
(1 - keep) quantile of the histogram, linear inside its bin.

A bin is the top 16 bits of |x|'s float32 pattern (8 exponent and 7 mantissa bits: its edges are
the bfloat16 values, each bin 2^-8 to 2^-7 of its value wide). So the fraction of the calibration
entries above t is within that one bin's share of the entries of `keep`: the tolerance `calibrate`
returns per block (under 1 % on SmolLM2-135M's activations, and the interpolation's actual
error far below it).
"""

from __future__ import annotations

import struct

import torch

from zoo.blocks.threshold import Threshold
from zoo.errors import ZooError
from zoo.eval.perplexity import autocast

BINS = 1 << 15  # |x| >= 0: the sign bit of the top 16 is always clear


class Magnitudes:
    """A histogram of |x| over every x added: BINS counts, whatever the number of entries."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.counts = torch.zeros(BINS, dtype=torch.int64, device=device)

    def add(self, x: torch.Tensor) -> None:
        bins = (x.detach().float().view(torch.int32) >> 16).flatten() & (BINS - 1)  # |x|'s float32 top bits
        self.counts += torch.bincount(bins, minlength=BINS)

    def quantile(self, q: float) -> tuple[float, float]:
        """(t, tolerance): a fraction q of the entries counted lies at or below t, to within tolerance (the
        share of the entries in t's bin, where t is interpolated linearly)."""
        cum = self.counts.cumsum(0).double()
        n, below = float(cum[-1]), q * float(cum[-1])
        b = int(torch.searchsorted(cum, torch.tensor([below], dtype=torch.float64, device=cum.device)))
        inside = float(self.counts[b])
        lo, hi = (struct.unpack("<f", struct.pack("<I", bits))[0] for bits in (b << 16, (b << 16) | 0xFFFF))
        share = (below - (float(cum[b]) - inside)) / max(inside, 1.0)  # of bin b below t, in (0, 1]
        return lo + share * (hi - lo), inside / max(n, 1.0)


@torch.no_grad()
def calibrate(model, batches: list[tuple[torch.Tensor, torch.Tensor]],
              precision: str = "fp32") -> dict[str, tuple[float, float]]:
    """Set every Threshold block's threshold from `batches` of (inputs, targets); returns
    {module: (t, tolerance)}, the tolerance bounding |kept fraction of the calibration entries - keep|."""
    sites = {name: m for name, m in model.named_modules() if isinstance(m, Threshold)}
    if not sites:
        raise ZooError("calibrate: the model has no projection with sparsity kind 'threshold'")
    device = next(model.parameters()).device
    seen = {name: Magnitudes(device) for name in sites}
    hooks = [m.register_forward_pre_hook(lambda module, args, name=name: seen[name].add(args[0]))
             for name, m in sites.items()]
    for m in sites.values():
        m.threshold.fill_(-float("inf"))  # dense while calibrating
    was_training = model.training
    model.eval()
    try:
        for x, _ in batches:
            with autocast(precision, device):
                model(x.to(device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    out = {name: seen[name].quantile(1 - m.keep_fraction) for name, m in sites.items()}
    for name, m in sites.items():
        m.threshold.fill_(out[name][0])
    return out
