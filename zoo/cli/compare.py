"""`zoo compare DIR ... [--json] [--plot out.png] [--grad-plot grads.png]`: runs and evaluation records."""

from __future__ import annotations

from zoo.cli import print_json, print_table
from zoo.eval.compare import compare, find_runs, plot, plot_layer_grads, table


def add_parser(sub):
    p = sub.add_parser("compare", help="finished runs and evaluation records side by side (seeds aggregated as "
                                       "mean ± std), and a plot")
    p.add_argument("runs", nargs="+", metavar="DIR",
                   help="run folders, evaluation records (zoo eval --save), or folders of them (a sweep, a quickstart)")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.add_argument("--plot", metavar="PNG", help="write the figure: val loss vs tokens, final loss vs activated params")
    p.add_argument("--grad-plot", metavar="PNG",
                   help="write the per-layer gradient-norm figure (runs trained with train.layer_grad_norms = true)")
    return p


def run(args) -> int:
    runs = find_runs(args.runs, records=True)
    rows = compare(runs)
    if args.grad_plot:  # first: it is the one that can refuse, and then nothing is written
        plot_layer_grads(runs, rows, args.grad_plot)
    if args.plot:
        plot(runs, rows, args.plot)
    if args.json:
        print_json(rows)
        return 0
    headers, cells = table(rows)
    print_table(cells, headers)
    for figure in (args.plot, args.grad_plot):
        if figure:
            print(f"plot: {figure}")
    return 0
