"""Optimizers (slot `optimizer`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from zoo.schema import Invalid, param


@dataclass(frozen=True)
class AdamWConfig:
    """AdamW with decoupled weight decay on matrices (embeddings too), none on vectors (norm gains, biases)"""

    lr: float = param(2e-3, "peak learning rate", gt=0, le=10)
    betas: tuple[float, float] = param((0.9, 0.95), "Adam's beta1, beta2")
    eps: float = param(1e-8, "Adam's epsilon", gt=0)
    weight_decay: float = param(0.1, "decoupled weight decay on matrices", ge=0)

    def check(self) -> None:
        for i, beta in enumerate(self.betas):
            if not 0 <= beta < 1:
                raise Invalid(f"betas[{i}]", f"must be >= 0 and < 1, got {beta}")


def build_adamw(cfg: AdamWConfig, params) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    matrix = [p.dim() - getattr(p, "expert_dims", 0) >= 2 for p in params]  # stacked [E, n] expert vectors are vectors
    decay = [p for p, m in zip(params, matrix) if m]
    rest = [p for p, m in zip(params, matrix) if not m]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fusable(params))


def fusable(params: list[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW kernel takes these parameters (floating point, on CPU or CUDA): one kernel
    per step instead of ~10 elementwise ops per tensor (CPU, tiny recipe: 1.4 ms against 4.0 ms)."""
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


def register(registry) -> None:
    registry.register("optimizer", "adamw", AdamWConfig, build_adamw)
