"""`zoo eval DIR [--data PATH ...] [--json]`."""

from __future__ import annotations

from zoo.cli import print_json, print_table
from zoo.data import build_corpus, checkpoint_tokenizer, split_tokens, token_file, val_batches
from zoo.data.corpus import Files, FilesConfig
from zoo.eval.evaluate import evaluate
from zoo.io.checkpoint import load
from zoo.runs import resolve_checkpoint


def add_parser(sub):
    p = sub.add_parser("eval", help="validation loss, perplexity, measured sparsity, expert load, activated params")
    p.add_argument("run", metavar="DIR", help="a run folder (its newest checkpoint) or a checkpoint folder")
    p.add_argument("--data", nargs="+", metavar="PATH",
                   help="evaluate on these text / JSONL files or folders instead of the recipe's validation split")
    p.add_argument("--batches", type=int, metavar="N", help="batches to evaluate (default: the recipe's eval_batches)")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    return p


def run(args) -> int:
    ckpt = resolve_checkpoint(args.run)
    model = load(ckpt)
    recipe, cfg = model.recipe, model.recipe.train
    tok = checkpoint_tokenizer(ckpt, recipe)
    if args.data:
        tokens = token_file(Files(FilesConfig(paths=tuple(args.data)), key="--data"), tok)
    else:
        tokens = split_tokens(build_corpus(recipe), tok, recipe.data.val_fraction)[1]
    seq_len = min(cfg.seq_len, recipe.model.max_seq_len)
    batches = list(val_batches(tokens, seq_len, cfg.batch_size, args.batches or cfg.eval_batches))
    report = {"checkpoint": str(ckpt), **evaluate(model, batches, cfg.precision)}
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
    print_table(rows)
    return 0
