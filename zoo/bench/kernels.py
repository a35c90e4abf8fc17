"""Each kernel against its dense baseline at real model shapes: time, ratio, bytes floor."""

from __future__ import annotations

import argparse
import functools

import torch
import torch.nn.functional as F

from zoo.bench._measure import (
    add_threads_argument,
    apply_threads,
    bandwidth_gbs,
    copies,
    device_arg,
    machine,
    report,
    row,
    time_interleaved,
    time_ms,
)
from zoo.blocks.sparsity import TopK
from zoo.blocks.threshold import Threshold
from zoo.kernels import cpu
from zoo.kernels.grouped import grouped_mm, sort_by_expert
from zoo.kernels.ternary import TernaryWeight, quantize_rows, ternary_matmul
from zoo.kernels.topk_matmul import topk_matmul
from zoo.registry import get_registry

# (name, in, out): LLaMA-7B-like FFN, a 2B-class FFN, SmolLM2-135M's FFN and the tiny recipes' FFN (d_model
# 192, hidden 512)
SHAPES = [("7b-up", 4096, 11008), ("7b-down", 11008, 4096), ("2b-up", 2048, 5460), ("2b-down", 5460, 2048),
          ("smollm2-up", 576, 1536), ("smollm2-down", 1536, 576), ("tiny-up", 192, 1024), ("tiny-down", 512, 192)]
# (name, d_model, expert hidden, experts, top_k): OLMoE-like and the tiny MoE recipe
MOE_SHAPES = [("olmoe-up", 2048, 1024, 64, 8), ("tiny-moe-up", 192, 256, 8, 2)]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda")
    p.add_argument("--only", action="append", choices=["topk", "ternary", "moe", "moe-backends"],
                   help="run only these kernels (moe-backends: CUDA only)")
    p.add_argument("--keep", type=float, nargs="+", default=[0.5, 0.4], help="top-K keep fractions")
    p.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=list(DTYPES),
                   help="weight dtypes of the top-K kernel")
    p.add_argument("--batch", type=int, nargs="+", default=None, help="rows per call (default: 1 on CPU, 1 8 on CUDA)")
    p.add_argument("--shapes", nargs="+", default=None, choices=[s[0] for s in SHAPES + MOE_SHAPES],
                   help="shapes to run (default all)")
    p.add_argument("--tokens", type=int, default=None, help="tokens per MoE call (default 128 on CPU, 4096 on CUDA)")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per measurement (the fastest counts)")
    add_threads_argument(p)


def cold(make, nbytes: int) -> list:
    """Enough copies of an operand (made by `make()`) that rotating through them defeats the cache."""
    return [make() for _ in range(copies(nbytes, cold=True))]


def bench_topk(args, device, gbs) -> list[dict]:
    """Top-K sparse-input matmul vs the fastest dense matmul on the same rows, per dtype, batch and keep.

    Every way is timed in turns (`time_interleaved`). The baseline is the fastest of torch's dense
    ways to the same rows: `F.linear(x, W)`
    (W [out, in], nn.Linear's), `x @ Wt` (Wt [in, out], the kernel's layout) and, for one row,
    `F.linear` on the row repeated twice (on CPU bf16 two rows take a faster GEMM path than one).
    Where zoo's compiled CPU kernels are built, a second ratio is printed against zoo's own dense GEMV
    (the same kernel reading every row of Wt): the ratio of bytes read, at equal read speed, and a
    `threshold` row per keep: TEAL's threshold-sparse row (the `threshold` block at the keep quantile of
    |x|) through that dense GEMV, which reads only the nonzero entries' rows.
    """
    rows = []
    for name, d_in, d_out in _shapes(args, SHAPES):
        for dtype_name in args.dtype:
            dtype = DTYPES[dtype_name]
            ws = cold(functools.partial(torch.randn, d_out, d_in, device=device, dtype=dtype), d_in * d_out * 4)
            wts = [w.t().contiguous() for w in ws]
            compiled = device.type == "cpu" and cpu.usable(wts[0])
            for n in _batches(args, device):
                x = torch.randn(n, d_in, device=device, dtype=dtype)
                calls = {"F.linear(x, W)": (F.linear, [(x, w) for w in ws]),
                         "x @ Wt": (torch.matmul, [(x, wt) for wt in wts])}
                if n == 1:
                    pair = x.expand(2, -1).contiguous()
                    calls["F.linear(2 rows)"] = (F.linear, [(pair, w) for w in ws])
                dense_ways = list(calls)
                if compiled and n == 1:
                    calls["zoo GEMV"] = (cpu.gather_gemv, [(x.float(), None, wt) for wt in wts])
                sparse = {}
                for keep in args.keep:
                    values, idx = TopK(d_in, int(keep * d_in)).entries(x)  # the model's selection: ascending
                    if compiled and n == 1:
                        sparse[keep] = thresholded(x, keep)
                        calls[f"threshold {keep}"] = (cpu.gather_gemv, [(sparse[keep], None, wt) for wt in wts])
                    calls[f"topk {keep}"] = (topk_matmul, [(values, idx, wt) for wt in wts])
                    if compiled:  # the pure-torch path (F.embedding_bag) beside it
                        calls[f"bag {keep}"] = (functools.partial(topk_matmul, impl="torch"),
                                                [(values, idx, wt) for wt in wts])
                t = time_interleaved(calls, device, args.repeats)
                way = min(dense_ways, key=lambda k: t[k].best)
                baseline = {"baseline": way, **{f"dense {k} ms": round(t[k].best, 4) for k in dense_ways}}
                if "zoo GEMV" in t:
                    baseline["dense zoo GEMV ms"] = round(t["zoo GEMV"].best, 4)
                for keep in args.keep:
                    ms, read = t[f"topk {keep}"], n * int(keep * d_in) * d_out * dtype.itemsize
                    extra = {"impl": "zoo cpu" if compiled else ("triton" if device.type == "cuda" else "torch")}
                    if "zoo GEMV" in t:
                        extra["speedup_vs_zoo_dense"] = round(t["zoo GEMV"].best / ms.best, 3)
                    if compiled:
                        extra["embedding_bag ms"] = round(t[f"bag {keep}"].best, 4)
                    rows.append(row("topk", f"{name} {d_in}->{d_out} {dtype_name} b{n} keep{keep}", ms, t[way],
                                    read, gbs, GBs=round(read / ms.best / 1e6, 1), **extra, **baseline))
                    if keep in sparse:
                        ms, read = t[f"threshold {keep}"], int((sparse[keep] != 0).sum()) * d_out * dtype.itemsize
                        rows.append(row("threshold", f"{name} {d_in}->{d_out} {dtype_name} b{n} keep{keep}", ms,
                                        t[way], read, gbs, GBs=round(read / ms.best / 1e6, 1), impl="zoo cpu",
                                        speedup_vs_zoo_dense=round(t["zoo GEMV"].best / ms.best, 3), **baseline))
    return rows


def thresholded(x: torch.Tensor, keep: float) -> torch.Tensor:
    """x [1, in] through a `threshold` block set at the (1 - keep) quantile of |x|, in fp32."""
    block = Threshold(x.shape[-1], keep)
    block.threshold.fill_(float(x.float().abs().quantile(1 - keep)))
    return block(x.float())


def bench_ternary(args, device, gbs) -> list[dict]:
    """Ternary (packed on CUDA; on CPU the compiled kernel's [in, out] int8 rows where built, else the
    int8 layout for `torch._int_mm`), alone and with the top-K gather, vs the fastest dense float way
    (fp32 on CPU: `F.linear` or `x @ Wt`; bf16 `F.linear` on CUDA), all timed in turns."""
    rows, cuda = [], device.type == "cuda"
    base_dtype = torch.bfloat16 if cuda else torch.float32
    per_weight = 0.25 if cuda else 1.0  # bytes read per weight
    compiled = not cuda and cpu.available()
    layouts = ("packed",) if cuda else ("rows",) if compiled else ("int8",)
    for name, d_in, d_out in _shapes(args, SHAPES):
        ws = cold(functools.partial(torch.randn, d_out, d_in, device=device, dtype=base_dtype), d_in * d_out * 4)
        wts = [w.t().contiguous() for w in ws]
        tws = cold(functools.partial(_ternary, d_out, d_in, device, layouts), int(d_in * d_out * per_weight))
        tws = (tws * -(-len(ws) // len(tws)))[:max(len(ws), len(tws))]
        for n in _batches(args, device):
            x = torch.randn(n, d_in, device=device, dtype=base_dtype)
            xq, s = quantize_rows(x)
            calls = {"F.linear": (F.linear, [(x, w) for w in ws])}
            if not cuda:
                calls["x @ Wt"] = (torch.matmul, [(x, wt) for wt in wts])
            dense_ways = list(calls)
            calls["ternary"] = (ternary_matmul, [(xq, tw, 1 / s) for tw in tws])
            for keep in args.keep:
                idx = x.abs().topk(int(keep * d_in), dim=-1).indices
                calls[f"topk {keep}"] = (ternary_matmul, [(xq.gather(-1, idx), tw, 1 / s, idx) for tw in tws])
            t = time_interleaved(calls, device, args.repeats)
            way = min(dense_ways, key=lambda k: t[k].best)
            extra = {"impl": "triton" if cuda else "zoo cpu" if compiled else "torch", "baseline": way}
            rows.append(row("ternary", f"{name} {d_in}->{d_out} b{n} vs {str(base_dtype)[6:]}", t["ternary"],
                            t[way], int(d_in * d_out * per_weight), gbs, **extra))
            for keep in args.keep:
                k = int(keep * d_in)
                # bytes read: the kept rows (CUDA, and the compiled CPU kernel at one row); torch's CPU path
                # multiplies the masked row densely
                read = n * k * d_out * per_weight if cuda or (compiled and n == 1) else d_in * d_out
                rows.append(row("ternary+topk", f"{name} {d_in}->{d_out} b{n} keep{keep}", t[f"topk {keep}"],
                                t[way], int(read), gbs, **extra))
    return rows


def _ternary(d_out: int, d_in: int, device, layouts) -> TernaryWeight:
    return TernaryWeight.from_ternary(torch.randint(-1, 2, (d_out, d_in), device=device), layouts)


def _grouped_step(x, w, offsets, rows, g) -> None:
    y = grouped_mm(x, w, offsets, rows)
    if g is not None:
        y.backward(g)


def _dense_step(x, w, g) -> None:
    y = x @ w
    if g is not None:
        y.backward(g)


def bench_moe(args, device, gbs) -> list[dict]:
    """Grouped matmul (forward; forward+backward on CUDA) vs one dense matmul of the same FLOPs."""
    rows, cuda = [], device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    tokens = args.tokens or (4096 if cuda else 128)
    for name, d_model, hidden, experts, top_k in _shapes(args, MOE_SHAPES):
        x = torch.randn(tokens, d_model, device=device, dtype=dtype, requires_grad=cuda)
        w = torch.randn(experts, hidden, d_model, device=device, dtype=dtype, requires_grad=cuda)
        routes = torch.rand(tokens, experts, device=device).topk(top_k, -1).indices
        _, token_rows, offsets = sort_by_expert(routes, experts)
        xd = torch.randn(tokens * top_k, d_model, device=device, dtype=dtype, requires_grad=cuda)
        wd = torch.randn(d_model, hidden, device=device, dtype=dtype, requires_grad=cuda)
        flops = 2 * tokens * top_k * d_model * hidden
        nbytes = (w.numel() + x.numel() + tokens * top_k * hidden) * dtype.itemsize
        g = torch.randn(tokens * top_k, hidden, device=device, dtype=dtype)
        for label, grad in [("fwd", None)] + ([("fwd+bwd", g)] if cuda else []):
            with torch.set_grad_enabled(grad is not None):
                base = time_ms(_dense_step, [(xd, wd, grad)], device, args.repeats)
                ms = time_ms(_grouped_step, [(x, w, offsets, token_rows, grad)], device, args.repeats)
            mult = 1 if grad is None else 3
            rows.append(row(f"moe-{label}", f"{name} T{tokens} {d_model}->{hidden} E{experts} k{top_k} "
                            f"{str(dtype)[6:]}", ms, base, nbytes * mult, gbs,
                            TFLOPs=round(mult * flops / ms.best / 1e9, 3),
                            dense_TFLOPs=round(mult * flops / base.best / 1e9, 3)))
    return rows


def bench_moe_backends(args, device, gbs) -> list[dict]:
    """CUDA: every other registered MoE kernel backend (torch._grouped_mm, megablocks when installed) on the
    same expert-sorted rows, forward, against the same dense matmul; the `triton` row is ours."""
    registry, rows = get_registry(), []
    tokens, dtype = args.tokens or 4096, torch.bfloat16
    for name, d_model, hidden, experts, top_k in _shapes(args, MOE_SHAPES):
        routes = torch.rand(tokens, experts, device=device).topk(top_k, -1).indices
        _, _, offsets = sort_by_expert(routes, experts)
        x = torch.randn(tokens * top_k, d_model, device=device, dtype=dtype)
        w = torch.randn(experts, hidden, d_model, device=device, dtype=dtype)  # the MoE block's [E, out, in]
        wd = torch.randn(d_model, hidden, device=device, dtype=dtype)
        base = time_ms(torch.matmul, [(x, wd)], device, args.repeats)
        nbytes = (w.numel() + x.numel() + x.shape[0] * hidden) * dtype.itemsize
        for kind in sorted(set(registry.kinds("kernel-backend")) - {"auto"}):
            entry = registry.get("kernel-backend", kind)
            try:
                backend = entry.factory(entry.config(), None)
                t = time_ms(backend.grouped_mm, [(x, w, offsets)], device, args.repeats)
            except Exception as err:  # a backend that cannot run here is reported, not fatal
                rows.append({"kernel": f"moe-backend {kind}", "shape": name, "error": f"{type(err).__name__}: {err}"})
                continue
            rows.append(row(f"moe-backend {kind}", f"{name} T{tokens} {d_model}->{hidden} E{experts} k{top_k} bfloat16",
                            t, base, nbytes, gbs, TFLOPs=round(2 * x.shape[0] * d_model * hidden / t.best / 1e9, 3)))
    return rows


def _shapes(args, table):
    return [s for s in table if not args.shapes or s[0] in args.shapes]


def _batches(args, device) -> list[int]:
    return args.batch or ([1, 8] if device.type == "cuda" else [1])


KERNELS = {"topk": bench_topk, "ternary": bench_ternary, "moe": bench_moe, "moe-backends": bench_moe_backends}
CUDA_ONLY = {"moe-backends"}


def measure(args) -> tuple[dict, list[dict]]:
    """(header facts, result rows) of the kernels named by args.only (default all)."""
    apply_threads(args)
    device = torch.device(args.device)
    gbs = bandwidth_gbs(device)
    results = []
    for name in args.only or [k for k in KERNELS if device.type == "cuda" or k not in CUDA_ONLY]:
        results += KERNELS[name](args, device, gbs)
    header = {"machine": machine(device), "torch": torch.__version__, "bandwidth_GBs": round(gbs, 1),
              "note": "ms = fastest of --repeat calls (median beside it); speedup = baseline_ms / ms; "
              "of_floor = floor_ms / ms (1.0 = at the measured bandwidth)"}
    return header, results


def run(args) -> int:
    report(*reversed(measure(args)), args.json)
    return 0
