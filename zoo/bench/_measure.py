"""Shared by the benchmarks: timing (median, cold cache), memory bandwidth, and the result table."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from zoo.console import print_table
from zoo.kernels import cpu

CACHE_BYTES = 256 << 20  # rotate through copies of the operands until this much: larger than any CPU's last-level cache


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call: the fastest call and the median."""

    best: float
    median: float


def add_threads_argument(p) -> None:
    """--threads: CPU threads for the run (on a CPU shared with other jobs, 1 thread gives steadier ratios)."""
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's default)")


def apply_threads(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)


def device_arg(name: str) -> str:
    """argparse type of --device: a device torch knows and this machine has (else a one-line usage error)."""
    import argparse

    try:
        device = torch.device(name)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{name!r} is not a device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{name!r}: no CUDA device on this machine")
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{name!r}: the benchmarks run on cpu or cuda")
    return name


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copies(nbytes: int, cold: bool) -> int:
    """How many copies of operands of `nbytes` to rotate through so that each call reads from memory, not cache."""
    return max(1, -(-CACHE_BYTES // max(nbytes, 1))) if cold else 1


def time_ms(fn: Callable[..., object], arg_sets: Sequence[tuple], device: torch.device,
            repeat: int = 15, warmup: int = 3) -> Timing:
    """Wall times of fn(*args) over `repeat` calls, rotating through `arg_sets` (copies of the operands).

    The fastest call is the figure of merit: on a shared CPU the other calls are slowed by other
    processes' time slices, not by the kernel; the median is reported beside it.
    """
    return time_interleaved({"": (fn, arg_sets)}, device, repeat, warmup)[""]


def time_interleaved(calls: dict[str, tuple[Callable[..., object], Sequence[tuple]]], device: torch.device,
                     repeat: int = 15, warmup: int = 3) -> dict[str, Timing]:
    """Wall times (as `time_ms`) of several (fn, arg_sets), taken in turns — one call of each per round — so that a slow
    stretch of a shared machine (its memory bandwidth drifts by tens of percent over seconds) falls on
    all of them alike, and the ratios between them stay fair. Every call takes the next copy of its
    operands in one count over all calls, so no call finds in cache what the call before it read.
    """
    count = 0  # one count over all calls: consecutive calls read different copies of their operands

    def next_args(arg_sets: Sequence[tuple]) -> tuple:
        nonlocal count
        count += 1
        return arg_sets[count % len(arg_sets)]

    for _ in range(warmup):
        for fn, arg_sets in calls.values():
            fn(*next_args(arg_sets))
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeat):
        for name, (fn, arg_sets) in calls.items():
            args = next_args(arg_sets)
            sync(device)
            t = time.perf_counter()
            fn(*args)
            sync(device)
            times[name].append(time.perf_counter() - t)
    return {name: Timing(min(ts) * 1e3, statistics.median(ts) * 1e3) for name, ts in times.items()}


def bandwidth_gbs(device: torch.device, nbytes: int = 512 << 20) -> float:
    """Read bandwidth (GB/s) measured now: the faster of two reads of a buffer much larger than the
    cache — `torch.sum`, and on CPU zoo's compiled GEMV streaming it as a matrix (it reads faster
    than torch's reduction here, and a floor must not be slower than what a kernel reaches)."""
    buf = torch.ones(nbytes // 4, device=device)
    best = time_ms(torch.sum, [(buf,)], device, repeat=15).best
    if device.type == "cpu":
        if cpu.available():
            rows = buf.view(-1, 4096)
            x = torch.ones(1, rows.shape[0])
            best = min(best, time_ms(cpu.gather_gemv, [(x, None, rows)], device, repeat=15).best)
    return nbytes / best / 1e6


def row(name: str, shape: str, t: Timing, base: Timing, nbytes: int, gbs: float, **extra) -> dict:
    """One result: kernel time, baseline time (same run), their ratio, the bytes floor at the measured bandwidth."""
    floor = nbytes / gbs / 1e6
    return {"kernel": name, "shape": shape, "ms": round(t.best, 4), "baseline_ms": round(base.best, 4),
            "speedup": round(base.best / t.best, 3), "floor_ms": round(floor, 4),
            "of_floor": round(floor / t.best, 3), "median_ms": round(t.median, 4),
            "baseline_median_ms": round(base.median, 4), **extra}


def report(rows: Sequence[dict], header: dict, as_json: bool) -> None:
    """Print `rows` as one JSON document or as an aligned table, preceded by the `header` facts."""
    if as_json:
        print(json.dumps({**header, "results": list(rows)}, indent=1))
        return
    for k, v in header.items():
        print(f"{k}: {v}")
    cols = list(dict.fromkeys(k for r in rows for k in r))
    print_table([[r.get(c, "") for c in cols] for r in rows], cols if rows else None)


def machine(device: torch.device) -> str:
    """A one-line description of where the benchmark ran."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import os
    import platform

    cpu = platform.processor() or platform.machine()
    return f"{cpu} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
