"""`zoo scaling fit DIR ... [--bootstrap N] [--json] [--plot out.png]`."""

from __future__ import annotations

import warnings

from zoo.cli import UsageError, print_json, print_table
from zoo.eval.compare import find_runs
from zoo.eval.scaling import NAMES, fit, fit_warnings, hold_out, law


def add_parser(sub):
    p = sub.add_parser("scaling", help="fit the Q-Sparse scaling law L(N, S) to finished runs")
    actions = p.add_subparsers(dest="action", metavar="ACTION", parser_class=type(p))
    f = actions.add_parser("fit", help="fit E, B, C, alpha, beta by L-BFGS on a Huber loss of log-loss")
    f.add_argument("runs", nargs="+", metavar="DIR", help="run folders, or folders of runs")
    f.add_argument("--bootstrap", type=int, default=200, metavar="N",
                   help="resamples of the runs for the 95%% intervals (default 200; 0 = none)")
    f.add_argument("--json", action="store_true", help="print one JSON document")
    f.add_argument("--plot", metavar="PNG",
                   help="write measured and fitted loss against N and against activated N·(1−S), per sparsity")
    return p


def run(args) -> int:
    if args.action != "fit":
        raise UsageError("zoo scaling: name an action: fit")
    if args.bootstrap < 0:
        raise UsageError(f"zoo scaling fit: --bootstrap {args.bootstrap}: expected 0 or more resamples")
    runs = find_runs(args.runs)
    N, S, L, nominal = [], [], [], []
    for r in runs:
        acc = r.summary["accounting"]
        measured = (r.summary.get("sparsity") or {}).get("overall")
        N.append(acc["non_embedding_params"])
        S.append(measured if measured is not None else acc["sparsity"])
        L.append(r.summary["val_loss"])
        nominal.append(acc["sparsity"])
    result = fit(N, S, L, bootstrap=args.bootstrap)
    held = hold_out(N, S, L)
    for line in fit_warnings(result, held):
        warnings.warn(line, stacklevel=1)
    if args.plot:
        plot_fit(N, S, L, nominal, result, args.plot)
    if args.json:
        print_json({**result.to_dict(), "held_out": held, "warnings": fit_warnings(result, held),
                    "data": [{"run": str(r.path), "N": n, "S": s, "loss": loss}
                             for r, n, s, loss in zip(runs, N, S, L)]})
        return 0
    ci = result.intervals

    def interval(k, fmt):
        return f"[{fmt.format(ci[k][0])}, {fmt.format(ci[k][1])}]" if k in ci else ""
    print("L(N, S) = E + (B + C·exp(β/(1−S)))·N^(−α)" +
          (f"; 95% intervals from {result.bootstrap} bootstrap resamples of the runs" if ci else ""))
    print_table([[k, f"{getattr(result, k):.4g}", interval(k, "{:.4g}")] for k in NAMES] +
                [["optimal sparsity S*", f"{result.optimal_sparsity:.2%}", interval("optimal_sparsity", "{:.2%}")],
                 ["fit error (RMSE of log-loss)", f"{result.rmse_log:.2e}", ""],
                 ["max relative error", f"{result.max_rel_error:.2%}", ""], ["runs", str(result.runs), ""]])
    if held:
        print("\nEach size held out (fitted without its runs, then predicted):")
        print_table([[f"{h['N']:,}", h["runs"], f"{h['mean_rel_error']:+.2%}", f"{h['max_abs_rel_error']:.2%}",
                      f"{h['optimal_sparsity']:.2%}"] for h in held],
                    ["held-out N", "runs", "mean error", "max |error|", "S* without it"])
    return 0


def sparsity_groups(nominal, gap: float = 0.04) -> list[int]:
    """A group index per run: nominal sparsities sorted, a new group wherever two neighbours differ by
    more than `gap` (one keep fraction gives slightly different K/width at different widths)."""
    order = sorted(range(len(nominal)), key=lambda i: nominal[i])
    group, out = 0, [0] * len(nominal)
    for prev, i in zip([None, *order], order):
        if prev is not None and nominal[i] - nominal[prev] > gap:
            group += 1
        out[i] = group
    return out


def plot_fit(N, S, L, nominal, result, path) -> None:
    """Left: loss vs N; right: loss vs activated parameters N·(1−S). One colour per group of nominal
    sparsity, the fitted curve drawn at the group's mean measured S."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    level = np.asarray(sparsity_groups(nominal))
    N, S, L = map(np.asarray, (N, S, L))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    grid = np.geomspace(N.min() / 1.5, N.max() * 1.5, 100)
    for lv in sorted(set(level.tolist())):
        g = level == lv
        s = float(S[g].mean())
        curve = law(grid, s, **result.constants)
        line = axes[0].plot(grid, curve, label=f"S = {s:.2f}")[0]
        axes[0].scatter(N[g], L[g], color=line.get_color(), s=14)
        axes[1].plot(grid * (1 - s), curve, color=line.get_color())
        axes[1].scatter(N[g] * (1 - S[g]), L[g], color=line.get_color(), s=14)
    for ax, x in zip(axes, ("non-embedding parameters N", "activated parameters N·(1−S)")):
        ax.set_xscale("log")
        ax.set_xlabel(x)
    axes[0].set_ylabel("validation loss")
    axes[0].legend(fontsize=7)
    axes[1].set_title(f"S* = {result.optimal_sparsity:.1%}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
