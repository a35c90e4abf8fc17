"""Training-free activation sparsity: `threshold`, TEAL-style magnitude thresholds (arXiv 2408.14690).

Each projection zeroes the entries of its input with |x| <= t, one threshold t per projection,
calibrated on text so that a fraction `keep` of the entries survives (`zoo calibrate`,
zoo.eval.calibrate). t is a buffer, so it is saved and checked with the checkpoint; a freshly
built block has t = 0 (it keeps every nonzero entry) until calibrated.

Contract (zoo.contracts.Sparsity): `keep_fraction` is the declared expected kept fraction (what
accounting counts, and what calibration aims at); the measured fraction varies per token (`zoo eval`
reports it). No fixed K is kept per row (`kept_count` is None) and the kept entries are not a top-K
(`magnitude_topk` is False), so no kernel selects them itself: inference runs the block ahead of the
matmul. The dropped entries are exact zeros (`zeros_inputs`), so at decode that matmul is the
sparse-input GEMV reading only the weight rows of the kept entries (zoo.kernels.cpu.gather_gemv,
`TransposedLinear`, `TernaryLinear`), like top-K's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from zoo.blocks.sparsity import mask_input
from zoo.contracts import Sparsity
from zoo.schema import param


@dataclass(frozen=True)
class ThresholdConfig:
    """TEAL: zero the entries with |x| at or below a per-projection threshold calibrated on text (zoo calibrate)"""

    keep: float = param(0.5, "expected kept fraction: what the thresholds are calibrated to, and what accounting "
                             "counts", gt=0, le=1)
    ste: bool = param(True, "straight-through backward: the gradient reaches every input, not only kept ones")


class Threshold(Sparsity):
    """y = x ⊙ (|x| > t) with one calibrated threshold t per projection; `keep_fraction` = the declared keep
    (`kept_count` None, `magnitude_topk` False: the contract's defaults); its zeros may be skipped."""

    zeros_inputs = True

    def __init__(self, width: int, keep: float, ste: bool = True):
        super().__init__()
        self.width, self.keep_fraction, self.ste = width, keep, ste
        self.register_buffer("threshold", torch.zeros(()))

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        return x.detach().abs() > self.threshold.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mask_input(x, self.mask(x), self.ste)

    def extra_repr(self) -> str:
        return f"t={float(self.threshold):.4g}, keep≈{self.keep_fraction:g} of {self.width}, ste={self.ste}"


def build_threshold(cfg: ThresholdConfig, ctx, width: int) -> Threshold:
    return Threshold(width, cfg.keep, cfg.ste)


def register(registry) -> None:
    registry.register("sparsity", "threshold", ThresholdConfig, build_threshold)
