"""The Q-Sparse inference-optimal scaling law L(N, S) = E + (B + C·exp(β/(1−S)))·N^(−α), fitted to runs.

Fit as in the paper: L-BFGS (scipy) on a Huber loss (δ = 1e-3) of the log-loss residuals, from a
grid of starting points. E, B and C are fitted through their logarithms so they stay positive.
Intervals come from a bootstrap over runs (resampled with replacement, refitted); the held-out
check refits without one model size and predicts it.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field

import numpy as np

from zoo.errors import ZooError

NAMES = ("E", "B", "C", "alpha", "beta")
# search box of the fitted vector (log E, log B, log C, alpha, beta)
BOUNDS = ((-10.0, 5.0), (-15.0, 10.0), (-15.0, 10.0), (0.0, 2.0), (-5.0, 5.0))
AT_BOUND = 1e-3  # within this fraction of its range from an edge, or a term below this share of the loss
HELD_OUT_WARN = 0.01  # a held-out size predicted worse than this (max relative error) is reported


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
    at_bounds: list[str] = field(default_factory=list)  # constants on the search box's edge or ~0
    negligible: list[str] = field(default_factory=list)  # those of at_bounds whose term is ~0 at every run
    # 95 % bootstrap percentile interval of each constant and of optimal_sparsity (when asked for)
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    bootstrap: int = 0  # resamples refitted for the intervals

    @property
    def constants(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in NAMES}

    def to_dict(self) -> dict:
        return asdict(self)


def _unpack(p) -> tuple[float, ...]:
    return math.exp(p[0]), math.exp(p[1]), math.exp(p[2]), float(p[3]), float(p[4])


def _check(N, S, L) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    N, S, L = (np.asarray(v, dtype=np.float64) for v in (N, S, L))
    if len(L) < len(NAMES):
        raise ZooError(f"the scaling law has {len(NAMES)} constants ({', '.join(NAMES)}); fitting it needs at "
                       f"least {len(NAMES)} runs, got {len(L)}")
    if len(set(N.tolist())) < 2 or len(set(S.tolist())) < 2:
        raise ZooError("the scaling fit needs runs of at least two model sizes and at least two sparsities")
    if np.any(L <= 0) or np.any(N <= 0) or np.any((S < 0) | (S >= 1)):
        raise ZooError("the scaling fit needs losses > 0, sizes > 0 and sparsities in [0, 1)")
    return N, S, L


def objective(p, logN, S, logL, delta: float) -> tuple[float, np.ndarray]:
    """The Huber loss of the log-loss residuals and its gradient in p = (log E, log B, log C, alpha, beta)."""
    E, B, C, alpha, beta = _unpack(p)
    z = beta / (1 - S)
    ce = C * np.exp(np.clip(z, -50, 50))
    na = np.exp(-alpha * logN)
    pred = E + (B + ce) * na
    r = np.log(pred) - logL
    w = np.clip(r, -delta, delta) / pred  # d huber / d pred
    ce_z = np.where(np.abs(z) < 50, ce, 0.0)
    grad = [E, B * na, ce * na, -(B + ce) * na * logN, ce_z * na / (1 - S)]
    return float(np.sum(huber(r, delta))), np.array([float(np.sum(w * g)) for g in grad])


def _minimise(N, S, L, delta: float, starts) -> np.ndarray:
    """The best L-BFGS-B optimum of the Huber loss over the given starting vectors."""
    from scipy.optimize import minimize

    best = None
    for x0 in starts:
        res = minimize(objective, x0, args=(np.log(N), S, np.log(L), delta), jac=True, method="L-BFGS-B",
                       bounds=BOUNDS, options={"maxiter": 1000, "ftol": 1e-15, "gtol": 1e-12})
        if best is None or res.fun < best.fun:
            best = res
    return best.x


def _grid_starts(L) -> list[list[float]]:
    e0 = math.log(0.8 * float(np.min(L)))
    return [[e0, b, c, a, 0.1] for b, c, a in itertools.product((-2.0, 1.0), (-2.0, 2.0), (0.1, 0.4))]


def _at_bounds(x, N, S) -> tuple[list[str], list[str]]:
    """(constants on an edge of the search box or whose term is negligible, those whose term of the law
    (E, B·N^−α or C·e^(β/(1−S))·N^−α) is below AT_BOUND of the predicted loss at every run):
    log-parametrised, such a constant drifts towards its lower edge on a flat objective and stops anywhere
    on the way. A constant on an edge whose term is not negligible (C on its lower edge with a large β:
    the term still rises steeply with S) is set by the box, traded off against another constant."""
    E, B, C, alpha, beta = _unpack(x)
    na = N ** -alpha
    pred = law(N, S, E, B, C, alpha, beta)
    share = {"E": E / pred, "B": B * na / pred, "C": C * np.exp(np.clip(beta / (1 - S), -50, 50)) * na / pred}
    negligible = [name for name in share if np.max(share[name]) < AT_BOUND]
    edge = [name for name, v, (lo, hi) in zip(NAMES, x, BOUNDS) if min(v - lo, hi - v) <= AT_BOUND * (hi - lo)]
    return [name for name in NAMES if name in edge or name in negligible], negligible


def fit(N, S, L, delta: float = 1e-3, bootstrap: int = 0, seed: int = 0) -> ScalingFit:
    """Fit the law to losses L of models with N parameters at sparsity S.

    With `bootstrap` > 0, refit that many resamples of the runs (drawn with replacement; a draw
    with fewer than two sizes or sparsities is redrawn), each from the full fit's optimum, and
    report the 2.5–97.5 percentile interval of every constant and of S*.
    """
    N, S, L = _check(N, S, L)
    x = _minimise(N, S, L, delta, _grid_starts(L))
    consts = _unpack(x)
    E, B, C, alpha, beta = consts
    pred = law(N, S, *consts)
    edges, negligible = _at_bounds(x, N, S)
    result = ScalingFit(E, B, C, alpha, beta, optimal_sparsity(B, C, alpha, beta),
                        rmse_log=float(np.sqrt(np.mean((np.log(pred) - np.log(L)) ** 2))),
                        max_rel_error=float(np.max(np.abs(pred / L - 1))), runs=len(L),
                        at_bounds=edges, negligible=negligible)
    if bootstrap:
        rng = np.random.default_rng(seed)
        draws = []
        while len(draws) < bootstrap:
            i = rng.integers(0, len(L), len(L))
            if len(set(N[i].tolist())) < 2 or len(set(S[i].tolist())) < 2:
                continue
            c = _unpack(_minimise(N[i], S[i], L[i], delta, [x]))
            draws.append([*c, optimal_sparsity(*c[1:])])
        lo, hi = np.percentile(np.array(draws), [2.5, 97.5], axis=0)
        result.intervals = {k: (float(a), float(b)) for k, a, b in zip((*NAMES, "optimal_sparsity"), lo, hi)}
        result.bootstrap = len(draws)
    return result


def hold_out(N, S, L, delta: float = 1e-3) -> list[dict]:
    """For each model size whose removal leaves a fittable set: fit without it, predict its runs.

    Rows: N, runs, mean_rel_error (signed: > 0 means the fit predicts too high a loss),
    max_abs_rel_error, and the S* of that fit.
    """
    N, S, L = _check(N, S, L)
    rows = []
    for n in sorted(set(N.tolist())):
        out = N == n
        try:
            f = fit(N[~out], S[~out], L[~out], delta)
        except ZooError:
            continue
        err = law(N[out], S[out], **f.constants) / L[out] - 1
        rows.append({"N": int(n), "runs": int(out.sum()), "mean_rel_error": float(err.mean()),
                     "max_abs_rel_error": float(np.abs(err).max()), "optimal_sparsity": f.optimal_sparsity})
    return rows


def fit_warnings(result: ScalingFit, held: list[dict]) -> list[str]:
    """One line for each reason not to trust the fit: constants on their bounds, held-out sizes missed."""
    out = []
    if result.at_bounds:
        where = ", ".join(f"{k} = {getattr(result, k):.3g}" for k in result.at_bounds)
        # E or B at ~0 is a law without that term (S* stays defined); alpha or beta on an edge is not
        shape = {"alpha", "beta"} & set(result.at_bounds)
        absent = [k for k in result.at_bounds if k in result.negligible]
        boxed = [k for k in result.at_bounds if k not in result.negligible and k not in shape]
        why = "; ".join(([f"the law fitted has no {' or '.join(absent)} term"] if absent else [])
                        + ([f"{' and '.join(boxed)} set by the box, {'its term' if len(boxed) == 1 else 'their terms'}"
                            " still in the law (traded off against the other constants)"] if boxed else []))
        out.append(f"the fit ended on the edge of its search box ({where}): the runs do not determine "
                   + ("the law, which is degenerate here: its S* is not a measurement" if shape else
                      f"{'that constant' if len(result.at_bounds) == 1 else 'those constants'} ({why})"))
    for row in held:
        if row["max_abs_rel_error"] > HELD_OUT_WARN:
            out.append(f"fitted without the runs at N = {row['N']:,}, the law misses them by up to "
                       f"{row['max_abs_rel_error']:.1%} (more than {HELD_OUT_WARN:.0%}): it does not predict "
                       "that size")
    return out
