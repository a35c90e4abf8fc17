"""`zoo eval NAME_OR_DIR [--set KEY=VALUE ...] [--data PATH ... | --tasks T1,T2 | --decode] [--heldout]
[--save DIR] [--json]`."""

from __future__ import annotations

import importlib
import json
from datetime import datetime, timezone
from pathlib import Path

import torch

from zoo._version import __version__
from zoo.bench._measure import add_threads_argument, apply_threads
from zoo.cli import UsageError, add_load_args, print_json, print_table
from zoo.data import build_corpus, checkpoint_tokenizer, split_tokens, token_file, val_batches
from zoo.data.corpus import Files, FilesConfig
from zoo.eval.evaluate import evaluate
from zoo.eval.heldout import heldout, texts
from zoo.eval.perplexity import decode_ms
from zoo.eval.record import check_target, merge_into, new_record, resolve, save_record
from zoo.files import write_atomic
from zoo.io.checkpoint import load
from zoo.kernels import prepare_inference
from zoo.model.accounting import account
from zoo.runs import DECODE, RECIPE, TASKS

# imports lm-eval (the optional `eval` extra, seconds to import): loaded by name only for --tasks
HARNESS = "zoo.eval.harness"
DECODE_PROMPT = 64  # tokens before the timed decode steps


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
    p.add_argument("--batch-size", type=int, default=8, metavar="N",
                   help="with --tasks: sequences per forward (default 8; lower it to lower the memory peak: the "
                        "logits of N windows of max_seq_len tokens)")
    p.add_argument("--decode", action="store_true",
                   help="only time decoding: ms per token at batch 1 on the decode engine, as zoo generate runs the "
                        "model (a run folder keeps it in decode.json, a record in itself; zoo compare shows it)")
    p.add_argument("--save", metavar="DIR",
                   help="write an evaluation record there (what was loaded, the results, activated params and decode "
                        "ms/token), which zoo compare lists beside runs; a record already there is replaced")
    add_threads_argument(p)
    p.add_argument("--json", action="store_true", help="print one JSON document")
    return p


def run(args) -> int:
    check_args(args)
    apply_threads(args)
    ckpt, overrides, is_rec = resolve(args.run, args.overrides)
    model = load(ckpt, overrides=overrides)
    recipe, cfg = model.recipe, model.recipe.train
    tok = checkpoint_tokenizer(ckpt, recipe)
    seq_len = min(cfg.seq_len, recipe.model.max_seq_len)
    accounting = account(model, seq_len=seq_len).to_dict()
    measured: dict = {}
    if args.tasks:
        harness = importlib.import_module(HARNESS)
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        lm = harness.ZooLM(model, tok, harness.end_of_text(ckpt, tok), batch_size=args.batch_size)
        measured["tasks"] = harness.run_tasks(lm, tasks, args.limit, args.include)
        measured["task_limits"] = {task: args.limit for task in measured["tasks"]}
    elif not args.decode:
        if args.data:
            tokens = token_file(Files(FilesConfig(paths=tuple(args.data)), key="--data"), tok)
        else:
            tokens = split_tokens(build_corpus(recipe), tok, recipe.data.val_fraction)[1]
        batches = list(val_batches(tokens, seq_len, cfg.batch_size, args.batches or cfg.eval_batches))
        measured.update({k: v for k, v in evaluate(model, batches, cfg.precision).items() if k != "accounting"})
        if args.data:
            measured["data"] = [str(d) for d in args.data]
    if args.heldout:
        measured["heldout"] = heldout(model, tok, precision=cfg.precision)
    if args.decode or args.save:
        measured["decode"] = measure_decode(model, tok)  # last: it freezes the model
    saved = store(args, ckpt, overrides, is_rec, recipe.to_dict(), accounting, measured)
    report = {"checkpoint": str(ckpt), "overrides": overrides, "accounting": accounting, **measured}
    if args.json:
        print_json({**report, "saved": saved and str(saved)})
        return 0
    print_table(rows(report))
    if saved:
        print(f"saved: {saved}")
    return 0


def check_args(args) -> None:
    """Usage errors, before anything is loaded or evaluated."""
    if args.tasks and (args.data or args.batches):
        raise UsageError("zoo eval: --tasks runs lm-eval; it does not combine with --data or --batches")
    if args.decode and (args.tasks or args.data or args.batches or args.heldout):
        raise UsageError("zoo eval: --decode only times decoding; it does not combine with --tasks, --data, "
                         "--batches or --heldout")
    if args.limit is not None and (args.limit < 1 or not args.tasks):
        raise UsageError("zoo eval: --limit N needs --tasks and N >= 1")
    if (args.include or args.batch_size != 8) and not args.tasks:
        raise UsageError("zoo eval: --include and --batch-size need --tasks")
    if args.batch_size < 1:
        raise UsageError("zoo eval: --batch-size must be >= 1")
    if args.threads is not None and args.threads < 1:
        raise UsageError("zoo eval: --threads must be >= 1")
    if args.save:
        check_target(args.save)


def measure_decode(model, tok) -> dict:
    """Decode ms/token of the model's inference form (frozen and prepared, as zoo generate runs it) after the
    first tokens of the KJV held-out tail, and when it was taken. Freezes `model` in place."""
    n = min(DECODE_PROMPT, model.config.max_seq_len // 2)
    prompt = torch.from_numpy(texts(tok)["kjv-tail"][:n])[None]
    return {**decode_ms(prepare_inference(model.freeze().eval()), prompt), "date": now()}


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def store(args, ckpt: Path, overrides: list[str], is_rec: bool, recipe: dict, accounting: dict,
          measured: dict) -> Path | None:
    """--save: a new record. Else, without --set, what a run folder or a record keeps: a run folder its lm-eval
    scores (tasks.json, merged by task) and its decode time (decode.json); a record all of it (merged)."""
    if args.save:
        return save_record(args.save, new_record(args.run, ckpt, overrides, recipe, accounting, measured, now(),
                                                 __version__))
    if args.overrides:
        return None
    if is_rec:
        merge_into(args.run, measured)
        return Path(args.run)
    run = Path(args.run)
    if not (run / RECIPE).is_file() or not ("tasks" in measured or "decode" in measured):
        return None
    if "tasks" in measured:
        path = run / TASKS
        old = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        write_atomic(path, json.dumps({**old, **measured["tasks"]}, indent=2) + "\n")
    if "decode" in measured:
        write_atomic(run / DECODE, json.dumps(measured["decode"], indent=2) + "\n")
    return run


def rows(report: dict) -> list[list]:
    """The report as the table zoo eval prints."""
    acc = report["accounting"]
    out = [["checkpoint", report["checkpoint"]]]
    if report["overrides"]:
        out.append(["overrides", " ".join(report["overrides"])])
    out.append(["params (total / activated)", f"{acc['total_params']:,} / {acc['activated_params']:,.0f}"])
    out.append(["FLOPs per token", f"{acc['flops_per_token']:,.0f}"])
    if "val_loss" in report:
        out += [["tokens evaluated", report["tokens"]], ["val loss", f"{report['val_loss']:.4f}"],
                ["perplexity", f"{report['val_ppl']:.3f}"],
                ["measured sparsity (overall)", f"{report['sparsity']['overall']:.3f}"]]
        out += [[f"  {role}", f"{x:.3f}"] for role, x in report["sparsity"]["by_role"].items()]
        for e in report["expert_load"]:
            loads = " ".join(f"{x:.2f}" for x in e["load"])
            out.append([f"expert load {e['module']}", f"{loads}  (cv {e['load_cv']:.2f}, router entropy "
                                                      f"{e['router_entropy']:.2f} nats)"])
    for name, r in report.get("heldout", {}).items():
        if isinstance(r, dict):
            out.append([f"held-out {name} ({r['tokens']} tokens)",
                        f"perplexity {r['ppl']:.3f}  (loss {r['loss']:.4f}, sparsity {r['sparsity']:.3f})"])
    for task, metrics in report.get("tasks", {}).items():
        out += [[f"{task} {metric}", f"{value:.4f}"] for metric, value in metrics.items()]
    if "decode" in report:
        d = report["decode"]
        threads = f"{d['threads']} CPU thread" + ("s" if d["threads"] != 1 else "")
        out.append(["decode ms/token (batch 1)", f"{d['ms_per_token']:.2f}  ({threads}, "
                    f"{'compiled' if d['compiled'] else 'eager'} step, median of {d['tokens']} after a "
                    f"{d['prompt']}-token prompt)"])
    return out
