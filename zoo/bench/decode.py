"""Decode and prefill tokens/s at batch 1: zoo's variants of a model (decode engine) beside transformers and llama.cpp.

Two modes:

- `--model PATH` (a zoo checkpoint folder or a GGUF file): the model's zoo variants — dense,
  Q-Sparse top-K keep 0.5 on every projection input (the checkpoint's weights), BitNet b1.58
  frozen ± Q-Sparse (random weights at the model's shape: speed only) — in fp32 and bf16, then
  transformers (fp32, its own forward with its KV cache) and llama.cpp (llama-cpp-python, when
  importable) at F32 / F16 / Q8_0 / Q4_1, the files made by its quantize API from the GGUF (the
  checkpoint's source GGUF for a converted checkpoint) and kept beside it in --cache;
- without `--model`: the same variants of --recipe (default the paper's 300M shape) and its MoE twin
  (8 experts, top-2, each half the dense hidden width: equal activated parameters), random weights.

Every runtime decodes the same tokens after the same prompt, in turns (one round of every runtime,
then the next round), so a slow stretch of a shared machine falls on all alike; ms/token is the
median over rounds of each round's median step. `floor_ms` is the weight bytes one token reads
divided by the read bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import zoo
from zoo.bench._measure import add_threads_argument, apply_threads, bandwidth_gbs, machine, report
from zoo.contracts import FFN, InferenceForm
from zoo.errors import ZooError
from zoo.io.checkpoint import load
from zoo.io.gguf import from_gguf
from zoo.io.hf import HFConfig, default_arch, exportable, scatter, writer
from zoo.kernels.prepare import prepare_inference
from zoo.model.decode import Decoder
from zoo.recipe.loader import add_set_argument, apply_overrides
from zoo.recipe.recipe import recipe_from_dict
from zoo.runs import RECIPE as RECIPE_FILE
from zoo.runs import read_meta, resolve_checkpoint

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "paper" / "300m.toml"
TOPK = {"model.sparsity": {"kind": "topk", "keep": 0.5}}
BITNET = {"model.weights": {"kind": "bitnet158"}}
# (name, recipe overrides, random weights and frozen BitNet): the zoo variants of a model
VARIANTS = [("dense", {}, False), ("qsparse 0.5", TOPK, False), ("bitnet b1.58", BITNET, True),
            ("bitnet + qsparse 0.5", {**BITNET, **TOPK}, True)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LLAMA_TYPES = {"F32": 0, "F16": 1, "Q8_0": 7, "Q4_1": 3}  # llama.cpp's LLAMA_FTYPE_* values


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, metavar="PATH|NAME",
                   help="a zoo checkpoint or run folder, a catalogue model or a GGUF file: its zoo variants beside "
                        "transformers and llama.cpp")
    p.add_argument("--recipe", default=str(RECIPE), metavar="RECIPE|NAME|DIR",
                   help="without --model: the dense recipe, or the recipe of a catalogue model or checkpoint (its "
                        "shapes; weights are random) (default: the paper's 300M shape)")
    add_set_argument(p, "a key of the model's recipe (--model) or of --recipe")
    p.add_argument("--tokens", type=int, default=16, help="decode steps timed per runtime and round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds over all runtimes")
    p.add_argument("--prompt", type=int, default=64, help="prompt length before the timed decode steps")
    p.add_argument("--prefill", type=int, default=512, help="prompt length of the prefill measurement (0: none)")
    p.add_argument("--only", nargs="+", default=None, metavar="NAME",
                   help="runtimes whose name contains one of these words (e.g. zoo llama.cpp)")
    p.add_argument("--eager", action="store_true", help="zoo: the eager layers, not the compiled step")
    p.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "zoo-bench-decode"), metavar="OUT",
                   help="folder the llama.cpp files made from the GGUF are written to (made if missing)")
    add_threads_argument(p)


@dataclass
class Runtime:
    """One row: how to reset it, run a prompt, and decode one token (ids as Python ints)."""

    name: str
    weights: str
    nbytes: int  # weight bytes one decoded token reads
    prefill: object  # callable(list[int]) -> next id
    step: object  # callable(int) -> next id
    compile_s: float = 0.0


def zoo_runtime(name: str, model: torch.nn.Module, weights: str, max_len: int, compiled: bool) -> Runtime:
    dec = Decoder(model, max_len=max_len, compile=compiled)

    def prefill(ids: list[int]) -> int:
        return int(dec.prefill(torch.tensor([ids])).argmax())

    def step(tok: int) -> int:
        return int(dec.step(torch.tensor([[tok]])).argmax())

    return Runtime(name, weights, decode_nbytes(model), prefill, step)


def decode_nbytes(model: torch.nn.Module) -> int:
    """Weight bytes one decoded token reads: each inference form's `bytes_per_token`, an FFN reached by a
    share of the tokens (routed experts: `token_fraction`) that share of its tensors, every other parameter
    and buffer once (the embedding table only when the LM head multiplies by it)."""
    seen, total = set(), 0.0

    def count(tensors, fraction: float = 1.0) -> None:
        nonlocal total
        for t in tensors:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size() * fraction

    for m in model.modules():
        if isinstance(m, FFN) and m.token_fraction < 1:
            count((*m.parameters(), *m.buffers()), m.token_fraction)
        elif isinstance(m, InferenceForm):
            total += m.bytes_per_token()
            count((*m.parameters(), *m.buffers()), 0.0)
    embed = model.embed.weight  # a token reads one row of it, unless the head multiplies by it
    count(t for t in (*model.parameters(), *model.buffers()) if t is not embed)
    if getattr(model.head, "weight", None) is embed and not any(True for _ in model.head.buffers()):
        count([embed])  # a tied head without a copy of its own (TiedTransposedHead holds one)
    return int(total)


def moe_twin(recipe) -> tuple[str, dict, bool]:
    """The variant with 8 experts, top-2, each half the dense FFN's hidden width: the dense model's activated
    parameters (plus the router), for the MoE-vs-dense figure (without --model: random weights anyway)."""
    ffn = recipe.to_dict()["model"]["ffn"]
    expert = {**ffn, "hidden": ffn["hidden"] // 2}
    return "moe 8x top-2", {"model.ffn": {"kind": "moe", "num_experts": 8, "top_k": 2, "expert": expert}}, True


def zoo_runtimes(args, recipe, state: dict | None, max_len: int) -> list[Runtime]:
    out = []
    for name, overrides, synthetic in VARIANTS + ([moe_twin(recipe)] if state is None else []):
        for label, dtype in DTYPES.items():
            full = f"zoo {name} {label}"
            if not wanted(args, full):
                continue
            torch.manual_seed(0)
            model = zoo.build(recipe.replace(**{"model.max_seq_len": max_len, **overrides})).eval()
            if state is not None and not synthetic:
                model.load_state_dict(state)
            model = model.to(dtype)
            if synthetic:
                model.freeze()
            out.append(zoo_runtime(full, prepare_inference(model), label, max_len, not args.eager))
    return out


def transformers_runtime(recipe, state: dict) -> Runtime:
    """The model as transformers builds it (zoo's exporter maps the config and the weights; fp32)."""
    from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache


    exportable(recipe)
    _, conv = writer(default_arch(recipe))
    config = conv.config(recipe.model)
    tensors = scatter(conv.rules(HFConfig(config, "<bench>")), state)
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.float32).eval()
    missing, unexpected = hf.load_state_dict(tensors, strict=False)
    if unexpected or any("lm_head" not in name for name in missing):
        raise RuntimeError(f"transformers model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    hf.tie_weights()
    # the KV cache argument is `cache` in newer transformers, `past_key_values` before; filled in place
    kwarg = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"
    state = {}

    @torch.no_grad()
    def prefill(ids: list[int]) -> int:
        state["cache"] = DynamicCache()
        return int(hf(torch.tensor([ids]), use_cache=True, **{kwarg: state["cache"]}).logits[0, -1].argmax())

    @torch.no_grad()
    def step(tok: int) -> int:
        return int(hf(torch.tensor([[tok]]), use_cache=True, **{kwarg: state["cache"]}).logits[0, -1].argmax())

    nbytes = sum(p.numel() * p.element_size() for p in hf.parameters())  # a tied head is one parameter
    return Runtime("transformers", "fp32", nbytes, prefill, step)


def llama_runtimes(args, gguf: Path, max_len: int) -> list[Runtime]:
    import llama_cpp

    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    out = []
    for label, ftype in LLAMA_TYPES.items():
        if not wanted(args, f"llama.cpp {label}"):
            continue
        path = cache / f"{gguf.stem}-{gguf.stat().st_size}-{label}.gguf"
        if not path.exists():
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype, params.allow_requantize, params.nthread = ftype, True, threads
            tmp = path.with_suffix(".tmp")
            with quiet():  # llama.cpp logs every tensor it writes
                failed = llama_cpp.llama_model_quantize(str(gguf).encode(), str(tmp).encode(), params)
            if failed:
                raise RuntimeError(f"llama.cpp could not write {label} from {gguf}")
            tmp.rename(path)
        llm = llama_cpp.Llama(str(path), n_ctx=max_len, n_batch=max_len, n_threads=threads,
                              n_threads_batch=threads, verbose=False)

        def prefill(ids: list[int], llm=llm) -> int:
            llm.reset()
            llm.eval(ids)
            return int(llm.scores[llm.n_tokens - 1].argmax())

        def step(tok: int, llm=llm) -> int:
            llm.eval([tok])
            return int(llm.scores[llm.n_tokens - 1].argmax())

        out.append(Runtime(f"llama.cpp {label}", label, path.stat().st_size, prefill, step))
    return out


@contextlib.contextmanager
def quiet():
    """Standard output and error (the file descriptors: C code writes there too) to /dev/null inside."""
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, null):
            os.close(fd)


def wanted(args, name: str) -> bool:
    return not args.only or any(word in name for word in args.only)


def runtime_names() -> list[str]:
    """Every runtime `zoo bench decode` can time (the MoE twin without --model, llama.cpp with a GGUF)."""
    zoo_names = [f"zoo {name} {label}" for name, _, _ in [*VARIANTS, ("moe 8x top-2", None, True)] for label in DTYPES]
    return [*zoo_names, "transformers", *(f"llama.cpp {label}" for label in LLAMA_TYPES)]


def check_only(args) -> None:
    """Each --only word must name part of some runtime: a typo would otherwise time nothing."""
    names = runtime_names()
    for word in args.only or ():
        if not any(word in name for name in names):
            raise ZooError(f"zoo bench decode: --only {word!r} is in no runtime's name; runtimes: {', '.join(names)}")


def recipe_file(value: str) -> str:
    """A recipe file as given, else the recipe.toml of a catalogue model, run or checkpoint folder."""
    if Path(value).is_file():
        return value
    return str(resolve_checkpoint(value) / RECIPE_FILE)


def source_of(args, max_len: int):
    """(recipe, state dict or None, GGUF path or None)."""
    if args.model is None:
        return zoo.load_recipe(recipe_file(args.recipe), args.overrides), None, None
    path = Path(args.model)
    if path.suffix == ".gguf":
        model, recipe = from_gguf(path, max_seq_len=max_len)
        gguf = path
    else:
        path = resolve_checkpoint(path)
        model = load(path)
        recipe = model.recipe
        src = read_meta(path).get("source", {})
        gguf = Path(src["path"]) if src.get("format") == "gguf" and Path(src.get("path", "")).is_file() else None
    if args.overrides:
        recipe = recipe_from_dict(apply_overrides(recipe.to_dict(), args.overrides), source=str(path))
    return recipe, model.state_dict(), gguf


def run(args) -> int:
    check_only(args)
    apply_threads(args)
    max_len = max(args.prefill, args.prompt + args.tokens + 2)
    recipe, state, gguf = source_of(args, max_len)
    runtimes, notes = zoo_runtimes(args, recipe, state, max_len), []
    if state is not None and wanted(args, "transformers"):
        try:
            runtimes.append(transformers_runtime(recipe, state))
        except ZooError as err:  # a recipe transformers has no architecture for
            notes.append(f"no transformers row: {err}")
    if gguf is not None:
        try:
            runtimes += llama_runtimes(args, gguf, max_len)
        except ImportError:
            notes.append("llama.cpp rows need llama-cpp-python (pip install 'qsparse-zoo[bench]')")
    elif args.model is not None:
        notes.append("no GGUF source: no llama.cpp rows")
    del state
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, recipe.model.vocab_size, (args.prompt,), generator=gen).tolist()
    long_prompt = torch.randint(0, recipe.model.vocab_size, (args.prefill,), generator=gen).tolist()
    for r in runtimes:  # warm-up: the zoo engine compiles its layer steps here (timed)
        t = time.perf_counter()
        tok = r.prefill(prompt)
        for _ in range(2):
            tok = r.step(tok)
        r.compile_s = time.perf_counter() - t
    gbs = bandwidth_gbs(torch.device("cpu"))
    steps: dict[str, list[float]] = {r.name: [] for r in runtimes}
    fills: dict[str, list[float]] = {r.name: [] for r in runtimes}
    for _ in range(args.rounds):
        for r in runtimes:
            tok, times = r.prefill(prompt), []
            for _ in range(args.tokens):
                t = time.perf_counter()
                tok = r.step(tok)
                times.append(time.perf_counter() - t)
            steps[r.name].append(statistics.median(times) * 1e3)
            if args.prefill:
                t = time.perf_counter()
                r.prefill(long_prompt)
                fills[r.name].append(time.perf_counter() - t)
    gbs = max(gbs, bandwidth_gbs(torch.device("cpu")))
    ms = {r.name: statistics.median(steps[r.name]) for r in runtimes}
    rows = []
    for r in runtimes:
        floor = r.nbytes / gbs / 1e6
        rows.append({"runtime": r.name, "weights": r.weights, "ms_per_token": round(ms[r.name], 2),
                     "tokens_per_s": round(1e3 / ms[r.name], 1), "floor_ms": float(f"{floor:.3g}"),
                     "of_floor": round(floor / ms[r.name], 2),
                     "prefill_tokens_per_s": round(args.prefill / statistics.median(fills[r.name]), 1)
                     if args.prefill else "", "warmup_s": round(r.compile_s, 1)})
    header = {"machine": machine(torch.device("cpu")), "torch": torch.__version__,
              "model": args.model or f"{args.recipe} (random weights)", "read_bandwidth_GBs": round(gbs, 1),
              "note": f"batch 1; decode: median over {args.rounds} interleaved rounds of the median of {args.tokens} "
                      f"steps after a {args.prompt}-token prompt; prefill: a {args.prefill}-token prompt; warmup_s: "
                      "first prompt and 2 steps (zoo: compiles its layer steps)", **dict(enumerate(notes))}
    report(rows + goal_rows(ms), header, args.json)
    return 0


GOALS = [  # (figure, numerator runtime, denominator runtime): ms ratios, < 1 means the first is faster
    ("zoo dense fp32 / llama.cpp F32", "zoo dense fp32", "llama.cpp F32"),
    ("zoo dense bf16 / llama.cpp F16", "zoo dense bf16", "llama.cpp F16"),
    ("zoo qsparse 0.5 fp32 / zoo dense fp32", "zoo qsparse 0.5 fp32", "zoo dense fp32"),
    ("zoo qsparse 0.5 fp32 / llama.cpp F32", "zoo qsparse 0.5 fp32", "llama.cpp F32"),
    ("zoo qsparse 0.5 bf16 / llama.cpp F16", "zoo qsparse 0.5 bf16", "llama.cpp F16"),
    ("zoo bitnet b1.58 fp32 / llama.cpp Q4_1", "zoo bitnet b1.58 fp32", "llama.cpp Q4_1"),
    ("zoo bitnet + qsparse 0.5 fp32 / llama.cpp Q4_1", "zoo bitnet + qsparse 0.5 fp32", "llama.cpp Q4_1"),
    ("zoo bitnet b1.58 bf16 / llama.cpp Q4_1", "zoo bitnet b1.58 bf16", "llama.cpp Q4_1"),
    ("zoo bitnet + qsparse 0.5 bf16 / llama.cpp Q4_1", "zoo bitnet + qsparse 0.5 bf16", "llama.cpp Q4_1"),
    ("zoo bitnet b1.58 fp32 / zoo dense fp32", "zoo bitnet b1.58 fp32", "zoo dense fp32"),
    ("zoo bitnet + qsparse 0.5 fp32 / zoo dense fp32", "zoo bitnet + qsparse 0.5 fp32", "zoo dense fp32"),
    ("zoo moe 8x top-2 fp32 / zoo dense fp32", "zoo moe 8x top-2 fp32", "zoo dense fp32"),
]


def goal_rows(ms: dict[str, float]) -> list[dict]:
    """The issue's figures: the time ratio of two rows of this run (< 1: the first is faster)."""
    return [{"runtime": figure, "weights": "ratio", "ms_per_token": round(ms[a] / ms[b], 3)}
            for figure, a, b in GOALS if a in ms and b in ms]
