"""All GPU checks in one run: the gpu-marked tests, the kernel benchmarks on CUDA, and a short table of goals."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch

from zoo.bench import kernels
from zoo.bench._measure import report
from zoo.errors import ZooError

# (kernel row prefix, what is compared, goal): the GPU goals of docs/kernels.md
GOALS = [("topk", "of_floor", 0.70, "sparse GEMV: fraction of measured HBM bandwidth on the bytes it reads"),
         ("ternary+topk", "of_floor", 0.50, "ternary + top-K gather: fraction of HBM bandwidth"),
         ("moe-fwd", "speedup", 0.60, "MoE grouped matmul forward: throughput / dense bf16 cuBLAS"),
         ("moe-fwd+bwd", "speedup", 0.60, "MoE grouped matmul fwd+bwd: throughput / dense bf16 cuBLAS")]


class NoCudaError(ZooError):
    """`zoo bench gpu` on a machine without a CUDA device."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tests", default=None, help="the repository's tests folder (default: beside the zoo package)")
    p.add_argument("--skip-tests", action="store_true", help="only the benchmarks")


def run_gpu_tests(tests: Path) -> dict:
    """pytest -m gpu on the kernel tests; returns the exit code and the summary line."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", str(tests), "-p", "no:cacheprovider"],
                          capture_output=True, text=True)
    print(proc.stdout[-4000:], proc.stderr[-2000:], sep="\n")
    summary = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
    return {"returncode": proc.returncode, "summary": summary}


def run(args) -> int:
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
