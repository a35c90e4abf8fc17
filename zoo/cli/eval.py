"""`zoo eval NAME_OR_DIR [--set KEY=VALUE ...] [--data PATH ...] [--json]`."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from zoo.cli import UsageError, add_load_args, print_json, print_table
from zoo.data import build_corpus, checkpoint_tokenizer, split_tokens, token_file, val_batches
from zoo.data.corpus import Files, FilesConfig
from zoo.eval.evaluate import evaluate
from zoo.eval.heldout import heldout
from zoo.files import write_atomic
from zoo.io.checkpoint import load
from zoo.runs import RECIPE, TASKS, resolve_checkpoint

# imports lm-eval (the optional `eval` extra, seconds to import): loaded by name only for --tasks
HARNESS = "zoo.eval.harness"


def add_parser(sub):
    p = sub.add_parser("eval", help="validation loss, perplexity, measured sparsity, expert load, activated params")
    add_load_args(p)
    p.add_argument("--data", nargs="+", metavar="PATH",
                   help="evaluate on these text / JSONL files or folders instead of the recipe's validation split")
    p.add_argument("--batches", type=int, metavar="N", help="batches to evaluate (default: the recipe's eval_batches)")
    p.add_argument("--heldout", action="store_true",
                   help="also report the two held-out texts: the KJV's last 2,048 tokens and Python standard-library "
                        "modules (zoo.eval.heldout)")
    p.add_argument("--tasks", metavar="T1,T2",
                   help="run these lm-eval tasks instead (zoo's local ones: zoo_kjv_next_verse, zoo_kjv_rolling, "
                        "zoo_stdlib_rolling; any lm-eval task whose data is local); needs the eval extra. For a run "
                        "folder the scores are also written to its tasks.json, which zoo compare shows")
    p.add_argument("--limit", type=int, metavar="N", help="with --tasks: at most N documents per task")
    p.add_argument("--include", metavar="DIR", help="with --tasks: a folder of lm-eval task YAML files")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    return p


def run(args) -> int:
    ckpt = resolve_checkpoint(args.run)
    model = load(ckpt, overrides=args.overrides)
    recipe, cfg = model.recipe, model.recipe.train
    tok = checkpoint_tokenizer(ckpt, recipe)
    if args.tasks:
        return run_tasks(args, ckpt, model, tok)
    if args.data:
        tokens = token_file(Files(FilesConfig(paths=tuple(args.data)), key="--data"), tok)
    else:
        tokens = split_tokens(build_corpus(recipe), tok, recipe.data.val_fraction)[1]
    seq_len = min(cfg.seq_len, recipe.model.max_seq_len)
    batches = list(val_batches(tokens, seq_len, cfg.batch_size, args.batches or cfg.eval_batches))
    report = {"checkpoint": str(ckpt), **evaluate(model, batches, cfg.precision)}
    if args.heldout:
        report["heldout"] = heldout(model, tok, precision=cfg.precision)
    if args.json:
        print_json(report)
        return 0
    acc = report["accounting"]
    rows = [["checkpoint", report["checkpoint"]], ["tokens evaluated", report["tokens"]],
            ["val loss", f"{report['val_loss']:.4f}"], ["perplexity", f"{report['val_ppl']:.3f}"],
            ["params (total / activated)", f"{acc['total_params']:,} / {acc['activated_params']:,.0f}"],
            ["FLOPs per token", f"{acc['flops_per_token']:,.0f}"],
            ["measured sparsity (overall)", f"{report['sparsity']['overall']:.3f}"]]
    rows += [[f"  {role}", f"{v:.3f}"] for role, v in report["sparsity"]["by_role"].items()]
    for e in report["expert_load"]:
        loads = " ".join(f"{v:.2f}" for v in e["load"])
        rows.append([f"expert load {e['module']}", f"{loads}  (cv {e['load_cv']:.2f}, router entropy "
                                                    f"{e['router_entropy']:.2f} nats)"])
    for name, r in report.get("heldout", {}).items():
        if isinstance(r, dict):
            rows.append([f"held-out {name} ({r['tokens']} tokens)",
                         f"perplexity {r['ppl']:.3f}  (loss {r['loss']:.4f}, sparsity {r['sparsity']:.3f})"])
    print_table(rows)
    return 0


def run_tasks(args, ckpt, model, tok) -> int:
    """`--tasks`: lm-eval scores; a run folder keeps them in tasks.json (merged by task) for zoo compare."""
    if args.data or args.heldout or args.batches:
        raise UsageError("zoo eval: --tasks runs lm-eval; it does not combine with --data, --heldout or --batches")
    if args.limit is not None and args.limit < 1:
        raise UsageError("zoo eval: --limit must be >= 1")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    harness = importlib.import_module(HARNESS)
    lm = harness.ZooLM(model, tok, harness.end_of_text(ckpt, tok))
    scores = harness.run_tasks(lm, tasks, args.limit, args.include)
    run = Path(args.run)
    if (run / RECIPE).is_file() and not args.overrides:
        path = run / TASKS
        old = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        write_atomic(path, json.dumps({**old, **scores}, indent=2) + "\n")
    if args.json:
        print_json({"checkpoint": str(ckpt), "tasks": scores})
        return 0
    print_table([[task, metric, f"{value:.4f}"] for task, metrics in scores.items()
                 for metric, value in metrics.items()], ["TASK", "METRIC", "VALUE"])
    return 0
