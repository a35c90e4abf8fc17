"""The Q-Sparse inference-optimal scaling law L(N, S) = E + (B + C·exp(β/(1−S)))·N^(−α), fitted to runs.

Fit as in the paper: L-BFGS (scipy) on a Huber loss (δ = 1e-3) of the log-loss residuals, from a
grid of starting points. E, B and C are fitted through their logarithms so they stay positive.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass

import numpy as np

from zoo.errors import ZooError

NAMES = ("E", "B", "C", "alpha", "beta")


def law(N, S, E: float, B: float, C: float, alpha: float, beta: float):
    """Predicted loss for N parameters at sparsity S (arrays broadcast)."""
    N, S = np.asarray(N, dtype=np.float64), np.asarray(S, dtype=np.float64)
    return E + (B + C * np.exp(beta / (1 - S))) * N ** (-alpha)


def optimal_sparsity(B: float, C: float, alpha: float, beta: float) -> float:
    """S* minimising the loss at fixed activated parameters N·(1−S): argmin (B + C·e^(β/(1−S)))·(1−S)^α."""
    from scipy.optimize import minimize_scalar

    def g(s: float) -> float:
        return math.log(B + C * math.exp(min(beta / (1 - s), 700))) + alpha * math.log(1 - s)
    return float(minimize_scalar(g, bounds=(0.0, 0.999), method="bounded", options={"xatol": 1e-6}).x)


def huber(r: np.ndarray, delta: float) -> np.ndarray:
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


@dataclass
class ScalingFit:
    E: float
    B: float
    C: float
    alpha: float
    beta: float
    optimal_sparsity: float
    rmse_log: float
    max_rel_error: float
    runs: int

    def to_dict(self) -> dict:
        return asdict(self)


def fit(N, S, L, delta: float = 1e-3) -> ScalingFit:
    """Fit the law to losses L of models with N parameters at sparsity S."""
    from scipy.optimize import minimize

    N, S, L = (np.asarray(v, dtype=np.float64) for v in (N, S, L))
    if len(L) < len(NAMES):
        raise ZooError(f"the scaling law has {len(NAMES)} constants ({', '.join(NAMES)}); fitting it needs at "
                       f"least {len(NAMES)} runs, got {len(L)}")
    if len(set(N.tolist())) < 2 or len(set(S.tolist())) < 2:
        raise ZooError("the scaling fit needs runs of at least two model sizes and at least two sparsities")
    if np.any(L <= 0) or np.any(N <= 0) or np.any((S < 0) | (S >= 1)):
        raise ZooError("the scaling fit needs losses > 0, sizes > 0 and sparsities in [0, 1)")
    logL = np.log(L)

    def unpack(p):
        return math.exp(p[0]), math.exp(p[1]), math.exp(p[2]), p[3], p[4]

    def objective(p):
        E, B, C, alpha, beta = unpack(p)
        pred = E + (B + C * np.exp(np.clip(beta / (1 - S), -50, 50))) * np.exp(-alpha * np.log(N))
        return float(np.sum(huber(np.log(pred) - logL, delta)))

    bounds = [(-10, 5), (-15, 10), (-15, 10), (0.0, 2.0), (-5.0, 5.0)]
    best = None
    lo = float(L.min())
    for b, c, a in itertools.product((-2.0, 1.0), (-2.0, 2.0), (0.1, 0.4)):
        res = minimize(objective, [math.log(0.8 * lo), b, c, a, 0.1], method="L-BFGS-B", bounds=bounds,
                       options={"maxiter": 1000, "ftol": 1e-15, "gtol": 1e-12})
        if best is None or res.fun < best.fun:
            best = res
    E, B, C, alpha, beta = unpack(best.x)
    pred = law(N, S, E, B, C, alpha, beta)
    return ScalingFit(E, B, C, alpha, beta, optimal_sparsity(B, C, alpha, beta),
                      rmse_log=float(np.sqrt(np.mean((np.log(pred) - logL) ** 2))),
                      max_rel_error=float(np.max(np.abs(pred / L - 1))), runs=len(L))
