"""All GPU checks in one run: the gpu-marked tests, the kernel benchmarks on CUDA, and a short table of goals.

`--compile-only` needs no GPU: every Triton kernel is compiled for the real cards (sm_90, sm_80) at every
autotune config it can launch, every dtype, the paper's 7B and the public MoE recipes' shapes, decode and
prefill, and the table shows its registers, shared memory, spills and grid against the cards' limits.
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from itertools import product
from pathlib import Path

import torch

from zoo.bench import kernels
from zoo.bench._measure import report
from zoo.blocks.sparsity import build_topk
from zoo.errors import ZooError
from zoo.kernels import aot
from zoo.kernels.dispatch import interpreting, recording
from zoo.kernels.grouped import grouped_mm
from zoo.kernels.ternary import TernaryWeight, ternary_matmul
from zoo.kernels.topk_matmul import topk_matmul
from zoo.recipe import load_recipe

# (kernel row prefix, what is compared, goal): the GPU goals of docs/kernels.md
GOALS = [("topk", "of_floor", 0.70, "sparse GEMV: fraction of measured HBM bandwidth on the bytes it reads"),
         ("ternary+topk", "of_floor", 0.50, "ternary + top-K gather: fraction of HBM bandwidth"),
         ("moe-fwd", "speedup", 0.60, "MoE grouped matmul forward: throughput / dense bf16 cuBLAS"),
         ("moe-fwd+bwd", "speedup", 0.60, "MoE grouped matmul fwd+bwd: throughput / dense bf16 cuBLAS")]


RECIPES = Path(__file__).resolve().parents[2] / "recipes"
DENSE_RECIPE = "paper/bitnet-qsparse-7b.toml"  # d_model 4096, GLU hidden 11008, top-K keep 0.7
MOE_RECIPES = {"mixtral": "public/mixtral-8x7b.toml", "olmoe": "public/olmoe-1b-7b.toml"}
BATCHES = {"decode": 1, "prefill": 512}  # tokens per call
FLOATS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
KERNELS = ("topk", "ternary", "moe")
SHAPES = ("7b-up", "7b-down", *(f"{name}-{part}" for name in MOE_RECIPES for part in ("up", "down")))


class NoCudaError(ZooError):
    """`zoo bench gpu` on a machine without a CUDA device."""


class CannotCompile(ZooError):
    """`zoo bench gpu --compile-only` where Triton cannot compile for CUDA (no nvidia tools, or interpreting)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tests", default=None, help="the repository's tests folder (default: beside the zoo package)")
    p.add_argument("--skip-tests", action="store_true", help="only the benchmarks")
    p.add_argument("--compile-only", action="store_true", help="no GPU: compile every Triton kernel for the cards, "
                   "print registers, shared memory, spills, grid")
    p.add_argument("--cards", nargs="+", choices=list(aot.CARDS), default=list(aot.CARDS),
                   help="--compile-only: the cards")
    p.add_argument("--kernels", nargs="+", choices=KERNELS, default=list(KERNELS), help="--compile-only: the kernels")
    p.add_argument("--dtypes", nargs="+", choices=[*FLOATS, "int8"], default=[*FLOATS, "int8"],
                   help="--compile-only: operand dtypes (int8: the ternary kernel; fp32 includes TF32 for the MoE)")
    p.add_argument("--batches", nargs="+", choices=list(BATCHES), default=list(BATCHES),
                   help="--compile-only: decode (1 token) and prefill (512 tokens)")
    p.add_argument("--shapes", nargs="+", choices=SHAPES, default=list(SHAPES),
                   help="--compile-only: the FFN projections (7b: the paper's dense 7B; the MoE recipes' experts)")
    p.add_argument("--every-launch", action="store_true",
                   help="--compile-only: one row per shape and batch, not the worst case per kernel, config, "
                   "dtype and card")


def run_gpu_tests(tests: Path) -> dict:
    """pytest -m gpu on the kernel tests; returns the exit code and the summary line."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", str(tests), "-p", "no:cacheprovider"],
                          capture_output=True, text=True)
    print(proc.stdout[-4000:], proc.stderr[-2000:], sep="\n")
    summary = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
    return {"returncode": proc.returncode, "summary": summary}


def run(args) -> int:
    if args.compile_only:
        return compile_only(args)
    if not torch.cuda.is_available():
        raise NoCudaError("zoo bench gpu needs a CUDA GPU and none is visible (torch.cuda.is_available() is False); "
                          "on CPU run `zoo bench kernels` and `pytest`")

    tests = Path(args.tests) if args.tests else Path(__file__).resolve().parents[2] / "tests"
    outcome = {"summary": "skipped", "returncode": 0}
    if not args.skip_tests:
        if not tests.is_dir():
            raise ZooError(f"{tests}: no tests folder here; pass --tests PATH (the repository's tests/)")
        outcome = run_gpu_tests(tests)
    kernel_args = argparse.ArgumentParser()
    kernels.add_arguments(kernel_args)
    header, results = kernels.measure(kernel_args.parse_args(["--device", "cuda"]))
    report(results, header, args.json)
    print("\n== GPU checks ==")
    print(f"gpu tests: {outcome['summary']}")
    ok = outcome["returncode"] == 0
    for prefix, field, goal, what in GOALS:
        rows = [r for r in results if r["kernel"] == prefix]
        if not rows:
            continue
        best = max(r[field] for r in rows)
        ok &= best >= goal
        print(f"{'ok  ' if best >= goal else 'MISS'} {what}: best {best:.2f} (goal >= {goal:.2f})")
    return 0 if ok else 1


# ---- --compile-only: the GPU footprint of every Triton kernel, without a GPU (zoo/kernels/aot.py) ----

@dataclass(frozen=True)
class Call:
    """One call of a Triton implementation on meta tensors; `run()` makes its launches (inside `recording`)."""

    kernel: str
    dtype: str
    shape: str
    batch: str
    run: Callable[[], object]


def _meta(*shape: int, dtype: torch.dtype, grad: bool = False) -> torch.Tensor:
    return torch.empty(*shape, device="meta", dtype=dtype, requires_grad=grad)


@contextmanager
def _tf32(allow: bool) -> Iterator[None]:
    """fp32 `tl.dot` runs in TF32 when torch allows it (the MoE kernel reads the flag at each call)."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allow
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def dense_calls(kernels, dtypes, batches, shapes) -> Iterator[Call]:
    """The top-K and ternary kernels at the paper's 7B FFN (4096->11008, 11008->4096, keep 0.7), called as
    `prepare_inference`'s projections call them."""
    model = load_recipe(RECIPES / DENSE_RECIPE).model
    d, hidden = model.d_model, model.ffn.config.hidden
    parts = {"7b-up": (d, hidden), "7b-down": (hidden, d)}
    for (shape, (d_in, d_out)), batch in product(((s, p) for s, p in parts.items() if s in shapes), batches):
        n, k = BATCHES[batch], build_topk(model.sparsity.config, None, d_in).k
        idx = _meta(n, k, dtype=torch.int64)
        if "topk" in kernels:
            for name in (t for t in FLOATS if t in dtypes):
                vals, wt = _meta(n, k, dtype=FLOATS[name]), _meta(d_in, d_out, dtype=FLOATS[name])
                yield Call("topk", name, shape, batch, partial(topk_matmul, vals, idx, wt, impl="triton"))
        if "ternary" in kernels and "int8" in dtypes:
            weight = TernaryWeight(d_in, d_out, packed=_meta(d_in, -(-d_out // 4), dtype=torch.uint8))
            scale = _meta(n, dtype=torch.float32)
            dense, kept = _meta(n, d_in, dtype=torch.int8), _meta(n, k, dtype=torch.int8)
            for xq, indices in ((dense, None), (kept, idx)):
                yield Call("ternary", "int8", shape, batch,
                           partial(ternary_matmul, xq, weight, scale, indices, impl="triton"))


def _moe_step(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, rows: torch.Tensor | None, tf32: bool) -> None:
    """Forward and backward of the Triton grouped matmul, as the `triton` kernel backend calls it."""
    with _tf32(tf32):
        y = grouped_mm(x, w, offsets, rows, impl="triton")
        y.backward(torch.empty_like(y))


def moe_calls(dtypes, batches, shapes) -> Iterator[Call]:
    """The grouped matmul, forward and backward, at the Mixtral and OLMoE experts: the GLU's gate+up projection
    (d -> 2·hidden, token rows gathered in the kernel) and its down projection (hidden -> d, rows sorted)."""
    precisions = [(name, tf32) for name in FLOATS if name in dtypes for tf32 in (False, True)[:1 + (name == "fp32")]]
    for recipe, path in MOE_RECIPES.items():
        model = load_recipe(RECIPES / path).model
        cfg = model.ffn.config
        d, hidden, experts = model.d_model, cfg.expert.config.hidden, cfg.num_experts
        parts = {f"{recipe}-up": (d, 2 * hidden, True), f"{recipe}-down": (hidden, d, False)}
        for (shape, (d_in, d_out, gather)), batch, (name, tf32) in product(
                ((s, p) for s, p in parts.items() if s in shapes), batches, precisions):
            tokens, rows = BATCHES[batch], BATCHES[batch] * cfg.top_k
            x = _meta(tokens if gather else rows, d_in, dtype=FLOATS[name], grad=True)
            w = _meta(experts, d_out, d_in, dtype=FLOATS[name], grad=True)
            order = _meta(rows, dtype=torch.int64) if gather else None
            ends = _meta(experts, dtype=torch.int32)  # offsets: each expert's last row + 1
            yield Call("moe", name + "/tf32" * tf32, shape, batch, partial(_moe_step, x, w, ends, order, tf32))


def footprint_rows(cards: list[str], kernels, dtypes, batches, shapes=SHAPES) -> list[dict]:
    """Every launch of every call, compiled for each card at every config it may run at: one dict per
    (card, call, launch, config)."""
    calls = [*dense_calls(kernels, dtypes, batches, shapes),
             *(moe_calls(dtypes, batches, shapes) if "moe" in kernels else ())]
    rows = []
    for card in (aot.CARDS[c] for c in cards):
        for call in calls:
            with recording(card.multiprocessors) as launches:
                call.run()
            for launch in launches:
                for fp in aot.footprints(launch, card):
                    gather = "+gather" if fp.constexprs.get("GATHER") else ""
                    tf32 = "/tf32" if fp.constexprs.get("PRECISION") == "tf32" else ""
                    rows.append({"kernel": fp.kernel.strip("_").removesuffix("_kernel").replace("_", "-") + gather,
                                 "config": fp.config, "dtype": call.dtype.split("/")[0] + tf32, "card": fp.card,
                                 "shape": call.shape,
                                 "batch": call.batch, "registers": fp.registers, "shared": fp.shared,
                                 "spills": fp.spills, "grid": fp.grid, "issues": fp.issues})
    return rows


def worst_case(rows: list[dict]) -> list[dict]:
    """One row per (kernel, config, dtype, card): the most registers, shared memory and spills, the largest
    grid on each axis over the shapes and batches, and every issue."""
    merged: dict[tuple, dict] = {}
    for r in rows:
        key = (r["kernel"], r["config"], r["dtype"], r["card"])
        m = merged.setdefault(key, {**{k: r[k] for k in ("kernel", "config", "dtype", "card")}, "registers": 0,
                                    "shared": 0, "spills": 0, "grid": (1, 1, 1), "issues": []})
        for k in ("registers", "shared", "spills"):
            m[k] = max(m[k], r[k])
        m["grid"] = tuple(max(a, b) for a, b in zip(m["grid"], r["grid"]))
        m["issues"] += [i for i in r["issues"] if i not in m["issues"]]
    return list(merged.values())


def _commit() -> str:
    proc = subprocess.run(["git", "-C", str(RECIPES.parent), "describe", "--always", "--dirty"], capture_output=True,
                          text=True)
    return proc.stdout.strip() if proc.returncode == 0 else "unknown"


def compile_only(args) -> int:
    """The footprint table; exit 1 when any compiled kernel breaks a limit of its card."""
    missing = aot.missing_tools()
    if missing:
        raise CannotCompile(f"zoo bench gpu --compile-only: cannot compile Triton kernels for CUDA: {missing}")
    if interpreting():
        raise CannotCompile("zoo bench gpu --compile-only: TRITON_INTERPRET is set, so Triton kernels are "
                            "interpreted, not compiled; unset it")
    import triton

    header = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "commit": _commit(), "triton": triton.__version__, "torch": torch.__version__,
              "cards": ", ".join(f"{c} = {aot.CARDS[c].name} ({aot.CARDS[c].multiprocessors} SMs, "
                                 f"{aot.CARDS[c].shared_limit // 1024} KB shared per block)" for c in args.cards)}
    rows = footprint_rows(args.cards, args.kernels, args.dtypes, args.batches, args.shapes)
    table = rows if args.every_launch else worst_case(rows)
    header["compiled"] = f"{len(rows)} launches x configs, {len(table)} rows"
    if not args.json:
        table = [{**r, "grid": "x".join(map(str, r["grid"])), "issues": "; ".join(r["issues"]) or "ok"}
                 for r in table]
    report(table, header, args.json)
    return 1 if any(r["issues"] for r in rows) else 0
