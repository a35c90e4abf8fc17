import dataclasses

import numpy as np
import pytest

import zoo
from zoo.eval.scaling import fit, fit_warnings, hold_out, law, objective, optimal_sparsity

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


# constants whose S* is inside (0, 1): 68.2 %
INNER = {"E": 1.2, "B": 0.2, "C": 3.0, "alpha": 0.3, "beta": 0.1}
S_STAR = optimal_sparsity(0.2, 3.0, 0.3, 0.1)


def grid(consts, noise=0.0, seed=0):
    """Four sizes x five sparsities, losses from the law times log-normal noise of `noise` (relative)."""
    N, S = np.meshgrid([2e5, 4.5e5, 8e5, 1.8e6], [0.0, 0.3, 0.45, 0.6, 0.75])
    N, S = N.ravel(), S.ravel()
    return N, S, law(N, S, **consts) * np.exp(np.random.default_rng(seed).normal(0, noise, N.size))


def test_bootstrap_intervals_hold_the_true_constants_and_s_star_under_noise():
    assert 0.6 < S_STAR < 0.7
    f = fit(*grid(INNER, noise=0.003), bootstrap=30, seed=1)
    assert f.bootstrap == 30 and set(f.intervals) == {*INNER, "optimal_sparsity"}
    for k, v in {**INNER, "optimal_sparsity": S_STAR}.items():
        lo, hi = f.intervals[k]
        assert lo < hi and lo <= v <= hi, (k, v, lo, hi)
        assert lo <= getattr(f, k) <= hi, k
    assert f.intervals["optimal_sparsity"][1] - f.intervals["optimal_sparsity"][0] < 0.3  # not the whole range
    # without noise every resample recovers the law: the intervals close on the truth
    exact = fit(*grid(INNER), bootstrap=5)
    assert exact.intervals["optimal_sparsity"] == pytest.approx((S_STAR, S_STAR), abs=1e-3)
    assert exact.at_bounds == [] and fit_warnings(exact, hold_out(*grid(INNER))) == []


def test_hold_out_predicts_each_left_out_size_and_flags_a_size_off_the_law():
    N, S, L = grid(INNER)
    rows = hold_out(N, S, L)
    assert [r["N"] for r in rows] == [200_000, 450_000, 800_000, 1_800_000] and all(r["runs"] == 5 for r in rows)
    assert max(r["max_abs_rel_error"] for r in rows) < 1e-4
    assert all(r["optimal_sparsity"] == pytest.approx(S_STAR, abs=1e-2) for r in rows)
    L_off = np.where(N == 1.8e6, L * 1.05, L)  # the largest size 5 % above the law
    rows = hold_out(N, S, L_off)
    big = rows[-1]
    assert big["mean_rel_error"] == pytest.approx(1 / 1.05 - 1, abs=2e-3)
    lines = fit_warnings(fit(N, S, L_off), rows)
    assert any("N = 1,800,000" in w and "more than 1%" in w for w in lines)


def test_a_fit_on_its_bounds_is_reported():
    N, S, _ = grid(INNER)
    flat = 2.0 + 0.3 * S  # no dependence on N: alpha ends at its lower bound 0
    f = fit(N, S, flat)
    assert "alpha" in f.at_bounds and f.alpha == pytest.approx(0, abs=1e-3)
    assert any("alpha = " in w and "degenerate" in w for w in fit_warnings(f, []))
    # a law without its B term (B at ~0) is named, but it is not degenerate: S* = 1 - beta/alpha
    no_b = {**INNER, "B": 0.0}
    g = fit(*grid(no_b))
    assert g.at_bounds == ["B"] and g.optimal_sparsity == pytest.approx(1 - 0.1 / 0.3, abs=1e-3)
    (line,) = fit_warnings(g, [])
    assert "(B = " in line and "no B term" in line and "degenerate" not in line and g.negligible == ["B"]


def test_plot_groups_runs_by_nominal_sparsity_across_widths():
    from zoo.cli.scaling import sparsity_groups

    # one keep fraction gives 0.17 at one width and 0.19 at another: one group; gaps > 0.04 split
    assert sparsity_groups([0.17, 0.0, 0.19, 0.36, 0.38, 0.0, 0.55, 0.61]) == [1, 0, 1, 2, 2, 0, 3, 4]


def test_objective_gradient_matches_central_differences():
    N, S, L = grid(INNER, noise=0.01)
    args = (np.log(N), S, np.log(L), 1e-2)  # delta wide enough that both Huber branches occur
    for p in ([0.1, -1.0, 1.2, 0.25, 0.15], [-0.5, 0.3, -2.0, 0.6, 0.9]):
        p = np.array(p)
        _, grad = objective(p, *args)
        h = 1e-6
        numeric = [(objective(p + h * e, *args)[0] - objective(p - h * e, *args)[0]) / (2 * h) for e in np.eye(5)]
        assert grad == pytest.approx(numeric, rel=1e-4, abs=1e-9)


def test_a_constant_boxed_with_its_term_still_in_the_law_is_not_called_absent():
    """C on its lower edge while its term still matters (a steep wall in S: large β) is named as set by the
    box, not as a term the law lacks; E at ~0 in the same fit is the absent term."""
    result = fit(*grid(INNER))
    boxed = dataclasses.replace(result, E=0.0, C=3e-7, at_bounds=["E", "C"], negligible=["E"])
    (line,) = fit_warnings(boxed, [])
    assert "no E term" in line and "C set by the box, its term still in the law" in line
    assert "no C term" not in line
