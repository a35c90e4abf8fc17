import numpy as np
import pytest

import zoo
from zoo.eval.scaling import fit, law, optimal_sparsity

TRUE = {"E": 1.6, "B": 0.8, "C": 6.0, "alpha": 0.25, "beta": 0.3}


def synthetic():
    N, S = np.meshgrid([1e5, 4e5, 1.6e6, 6.4e6, 2.5e7], [0.0, 0.3, 0.5, 0.7])
    N, S = N.ravel(), S.ravel()
    return N, S, law(N, S, **TRUE)


def test_fit_recovers_known_constants_from_the_formula():
    N, S, L = synthetic()
    f = fit(N, S, L)
    for k, v in TRUE.items():
        assert getattr(f, k) == pytest.approx(v, rel=0.02), k
    assert f.rmse_log < 1e-4 and f.runs == 20
    assert f.optimal_sparsity == pytest.approx(optimal_sparsity(0.8, 6.0, 0.25, 0.3), abs=1e-3)


def test_optimal_sparsity_minimises_loss_at_fixed_activated_params():
    s_star = optimal_sparsity(0.8, 6.0, 0.25, 0.3)
    grid = np.linspace(0, 0.95, 2000)
    Na = 1e6
    losses = law(Na / (1 - grid), grid, **TRUE)
    assert s_star == pytest.approx(grid[np.argmin(losses)], abs=1e-3)
    assert 0 < s_star < 0.95


def test_fit_refuses_too_few_runs_or_one_sparsity():
    N, S, L = synthetic()
    with pytest.raises(zoo.ZooError, match="needs at least 5 runs, got 4"):
        fit(N[:4], S[:4], L[:4])
    with pytest.raises(zoo.ZooError, match="two sparsities"):
        fit(N[:5], S[:5], L[:5])
