"""Decode tokens/s at batch 1: Q-Sparse and ternary models, prepared for inference, against their dense fp32 twin."""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

import zoo
from zoo.bench._measure import Timing, add_threads_argument, apply_threads, machine, report, time_ms
from zoo.kernels.prepare import prepare_inference
from zoo.recipe.loader import add_set_argument
from zoo.runs import RECIPE as RECIPE_FILE
from zoo.runs import resolve_checkpoint

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "paper" / "300m.toml"
TOPK = ["model.sparsity.kind='topk'", "model.sparsity.keep=0.5"]
BITNET = ["model.weights.kind='bitnet158'"]
# (name, recipe overrides, freeze BitNet weights, prepare_inference's impl or None: not prepared). The
# dense twin runs three ways: as built (nn.Linear), prepared with torch's ops only (`x @ Wt`), and
# prepared with zoo's kernels (the compiled GEMV where it is built). The fastest is every row's baseline.
DENSE = [("dense fp32 (nn.Linear)", [], False, None), ("dense fp32 (prepared, torch ops)", [], False, "torch"),
         ("dense fp32 (prepared, zoo kernels)", [], False, "auto")]
VARIANTS = [*DENSE, ("qsparse keep 0.5", TOPK, False, "auto"), ("bitnet b1.58", BITNET, True, "auto"),
            ("bitnet + qsparse 0.5", BITNET + TOPK, True, "auto")]
ONLY = {"qsparse": "qsparse keep 0.5", "bitnet": "bitnet b1.58", "bitnet-qsparse": "bitnet + qsparse 0.5"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", default=str(RECIPE), metavar="RECIPE|NAME|DIR",
                   help="the dense recipe, or the recipe of a catalogue model or checkpoint (its shapes; weights "
                        "are random) (default: the paper's 300M shape)")
    add_set_argument(p, "a key of the dense recipe (on every variant)")
    p.add_argument("--tokens", type=int, default=12, help="decode steps timed per model and round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds over all models (the fastest step counts)")
    p.add_argument("--prompt", type=int, default=8, help="prompt length before decoding")
    p.add_argument("--only", nargs="+", default=None, choices=list(ONLY),
                   help="variants to time besides the dense twin (default: all)")
    add_threads_argument(p)


def decode_ms(model: torch.nn.Module, prompt: int, tokens: int) -> Timing:
    """Time of one decode step (batch 1, KV cache) after a `prompt`-token prefill."""
    cache = model.new_cache(1)
    ids = torch.randint(0, model.config.vocab_size, (1, prompt))
    with torch.no_grad():
        nxt = model(ids, cache=cache).logits[:, -1:].argmax(-1)
        steps = iter(range(prompt, prompt + tokens + 3))

        def step(nxt_ids: torch.Tensor) -> None:
            model(nxt_ids, cache=cache, start=next(steps))

        return time_ms(step, [(nxt,)], torch.device("cpu"), repeat=tokens, warmup=3)


def recipe_file(value: str) -> str:
    """A recipe file as given, else the recipe.toml of a catalogue model, run or checkpoint folder."""
    if Path(value).is_file():
        return value
    return str(resolve_checkpoint(value) / RECIPE_FILE)


def run(args) -> int:
    apply_threads(args)
    args.recipe = recipe_file(args.recipe)
    overrides = ["model.max_seq_len=256", *args.overrides]
    models = []  # all built first, then timed in interleaved rounds: a slow moment of the machine hits every model
    for name, extra, freeze, prepare in VARIANTS:
        if args.only and (name, extra, freeze, prepare) not in DENSE and name not in {ONLY[o] for o in args.only}:
            continue
        model = zoo.build(zoo.load_recipe(args.recipe, overrides + extra)).eval()
        params = sum(p.numel() for p in model.parameters())
        if freeze:
            model.freeze()
        models.append((name, params, model if prepare is None else prepare_inference(model, prepare)))
    rounds = [[decode_ms(model, args.prompt, args.tokens) for _, _, model in models] for _ in range(args.rounds)]
    timed = [(name, params, Timing(min(r[i].best for r in rounds), statistics.median(r[i].median for r in rounds)))
             for i, (name, params, _) in enumerate(models)]
    base_name, _, base = min(timed[:len(DENSE)], key=lambda r: r[2].best)
    results = [{"model": name, "params_M": round(params / 1e6, 1), "ms_per_token": round(t.best, 2),
                "tokens_per_s": round(1e3 / t.best, 2), "speedup_vs_dense_fp32": round(base.best / t.best, 3),
                "median_ms": round(t.median, 2), "median_speedup": round(base.median / t.median, 3)}
               for name, params, t in timed]
    header = {"machine": machine(torch.device("cpu")), "torch": torch.__version__, "recipe": args.recipe,
              "overrides": " ".join(overrides), "baseline": f"{base_name} (the faster dense twin)",
              "note": "batch 1, KV cache; ms = fastest decode step of --rounds x --tokens (median of the rounds' "
                      "medians beside it); "
                      "speedups against the baseline; the other models prepared by zoo.kernels.prepare_inference"}
    report(results, header, args.json)
    return 0
