"""`zoo scaling fit DIR ... [--json] [--plot out.png]`."""

from __future__ import annotations

from zoo.cli import UsageError, print_json, print_table
from zoo.eval.compare import find_runs
from zoo.eval.scaling import fit, law


def add_parser(sub):
    p = sub.add_parser("scaling", help="fit the Q-Sparse scaling law L(N, S) to finished runs")
    actions = p.add_subparsers(dest="action", metavar="ACTION", parser_class=type(p))
    f = actions.add_parser("fit", help="fit E, B, C, alpha, beta by L-BFGS on a Huber loss of log-loss")
    f.add_argument("runs", nargs="+", metavar="DIR", help="run folders, or folders of runs")
    f.add_argument("--json", action="store_true", help="print one JSON document")
    f.add_argument("--plot", metavar="PNG", help="write measured vs fitted loss against N for each sparsity")
    return p


def run(args) -> int:
    if args.action != "fit":
        raise UsageError("zoo scaling: name an action: fit")
    runs = find_runs(args.runs)
    N, S, L = [], [], []
    for r in runs:
        acc = r.summary["accounting"]
        measured = (r.summary.get("sparsity") or {}).get("overall")
        N.append(acc["non_embedding_params"])
        S.append(measured if measured is not None else acc["sparsity"])
        L.append(r.summary["val_loss"])
    result = fit(N, S, L)
    if args.plot:
        plot_fit(N, S, L, result, law, args.plot)
    if args.json:
        print_json({**result.to_dict(), "data": [{"run": str(r.path), "N": n, "S": s, "loss": loss}
                                                 for r, n, s, loss in zip(runs, N, S, L)]})
        return 0
    print("L(N, S) = E + (B + C·exp(β/(1−S)))·N^(−α)")
    print_table([[k, f"{getattr(result, k):.4g}"] for k in ("E", "B", "C", "alpha", "beta")] +
                [["optimal sparsity S*", f"{result.optimal_sparsity:.2%}"],
                 ["fit error (RMSE of log-loss)", f"{result.rmse_log:.2e}"],
                 ["max relative error", f"{result.max_rel_error:.2%}"], ["runs", str(result.runs)]])
    return 0


def plot_fit(N, S, L, result, law, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 4.5))
    consts = {k: getattr(result, k) for k in ("E", "B", "C", "alpha", "beta")}
    grid = np.geomspace(min(N) / 1.5, max(N) * 1.5, 100)
    for s in sorted(set(round(x, 2) for x in S)):
        pts = [(n, loss) for n, x, loss in zip(N, S, L) if round(x, 2) == s]
        line = ax.plot(grid, law(grid, s, **consts), label=f"fit S={s:.2f}")[0]
        ax.scatter(*zip(*pts), color=line.get_color())
    ax.set_xscale("log")
    ax.set_xlabel("non-embedding parameters N")
    ax.set_ylabel("validation loss")
    ax.set_title(f"scaling fit, S* = {result.optimal_sparsity:.1%}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
