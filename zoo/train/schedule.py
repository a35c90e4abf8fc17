"""Learning-rate and weight-decay schedules (slot `schedule`), as multipliers of the optimizer's values.

`factory(cfg, steps)` returns `f(step) -> (lr_factor, wd_factor)` for steps 0..steps-1: a pure
function of the step, so a resumed run needs no scheduler state beyond the step number.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from zoo.schema import param

Schedule = Callable[[int], tuple[float, float]]


@dataclass(frozen=True)
class WarmupConfig:
    warmup_steps: int = param(50, "linear warm-up from 0 over this many steps (capped at a tenth of the run)", ge=0)
    min_lr_ratio: float = param(0.1, "final learning rate as a fraction of the peak", ge=0, le=1)


def warmup(cfg: WarmupConfig, steps: int, step: int) -> float | None:
    """The warm-up factor at `step`, or None once warm-up is over."""
    n = min(cfg.warmup_steps, steps // 10)
    return (step + 1) / (n + 1) if step < n else None


def cosine_from(lo: float, t: float) -> float:
    """1 at t=0 down to lo at t=1 along a half cosine."""
    return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * min(max(t, 0.0), 1.0)))


@dataclass(frozen=True)
class CosineConfig(WarmupConfig):
    """linear warm-up, then cosine decay to min_lr_ratio of the peak"""


def cosine(cfg: CosineConfig, steps: int) -> Schedule:
    n = min(cfg.warmup_steps, steps // 10)

    def f(step: int) -> tuple[float, float]:
        w = warmup(cfg, steps, step)
        return (w if w is not None else cosine_from(cfg.min_lr_ratio, (step - n) / max(steps - 1 - n, 1))), 1.0
    return f


@dataclass(frozen=True)
class WSDConfig(WarmupConfig):
    """warm-up, stable (constant peak), then a linear decay over the last decay_fraction of the run"""

    decay_fraction: float = param(0.2, "fraction of the run spent decaying", gt=0, le=1)


def wsd(cfg: WSDConfig, steps: int) -> Schedule:
    decay_start = steps - max(1, round(cfg.decay_fraction * steps))

    def f(step: int) -> tuple[float, float]:
        w = warmup(cfg, steps, step)
        if w is not None:
            return w, 1.0
        if step < decay_start:
            return 1.0, 1.0
        t = (step - decay_start + 1) / (steps - decay_start)
        return 1.0 - (1.0 - cfg.min_lr_ratio) * t, 1.0
    return f


@dataclass(frozen=True)
class ConstantConfig:
    """the peak learning rate throughout, after an optional warm-up"""

    warmup_steps: int = param(0, "linear warm-up from 0 over this many steps (capped at a tenth of the run)", ge=0)


def constant(cfg: ConstantConfig, steps: int) -> Schedule:
    return lambda step: (warmup(WarmupConfig(cfg.warmup_steps), steps, step) or 1.0, 1.0)


@dataclass(frozen=True)
class BitNetConfig(WarmupConfig):
    """BitNet b1.58's two stages: peak lr with weight decay, then from half-way a lower lr decaying
    (cosine) to min_lr_ratio with weight decay off"""

    stage2_lr_ratio: float = param(0.5, "learning rate at the start of stage 2, as a fraction of the peak",
                                   gt=0, le=1)
    stage2_at: float = param(0.5, "where stage 2 starts, as a fraction of the run", gt=0, lt=1)


def bitnet(cfg: BitNetConfig, steps: int) -> Schedule:
    mid = max(1, round(cfg.stage2_at * steps))

    def f(step: int) -> tuple[float, float]:
        w = warmup(cfg, steps, step)
        if w is not None:
            return w, 1.0
        if step < mid:
            return 1.0, 1.0
        t = (step - mid) / max(steps - 1 - mid, 1)
        lo = cfg.min_lr_ratio / cfg.stage2_lr_ratio if cfg.stage2_lr_ratio > cfg.min_lr_ratio else 1.0
        return cfg.stage2_lr_ratio * cosine_from(lo, t), 0.0
    return f


def register(registry) -> None:
    registry.register("schedule", "cosine", CosineConfig, cosine)
    registry.register("schedule", "wsd", WSDConfig, wsd)
    registry.register("schedule", "constant", ConstantConfig, constant)
    registry.register("schedule", "bitnet", BitNetConfig, bitnet)
