"""MoE layer fwd+bwd against a dense FFN of the same activated FLOPs and a one-expert-at-a-time baseline.

Rows: full-precision experts (baseline: the usual naive per-expert Python loop) and BitNet b1.58
experts with Q-Sparse top-K inputs (baseline: the per-expert path of ExpertProjection, which is
how such experts ran before BitLinear had `operands`).
"""

from __future__ import annotations

import json
import statistics
import time

import torch
import torch.nn.functional as F

from zoo.bench._measure import add_threads_argument, apply_threads
from zoo.model.build import build
from zoo.model.projection import ExpertProjection
from zoo.recipe.recipe import recipe_from_dict


def add_arguments(p) -> None:
    p.add_argument("--tokens", type=int, default=4096, help="tokens per batch (T)")
    p.add_argument("--d-model", type=int, default=512, help="model width (D)")
    p.add_argument("--experts", type=int, default=8, help="routed experts (E)")
    p.add_argument("--top-k", type=int, default=2, help="experts per token")
    p.add_argument("--hidden", type=int, default=1024, help="expert hidden width")
    p.add_argument("--backend", default="auto", help="kernel-backend kind of the MoE layer")
    p.add_argument("--weights", nargs="+", default=["fp", "bitnet158"], choices=["fp", "bitnet158"],
                   help="expert weights kinds to time (bitnet158 runs with Q-Sparse top-K inputs, --keep)")
    p.add_argument("--keep", type=float, default=0.5, help="top-K keep fraction of the BitNet rows")
    p.add_argument("--repeats", type=int, default=5, help="timed fwd+bwd rounds (the best is kept)")
    add_threads_argument(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and tokens (default: %(default)s)")


def ffn(args, spec: dict, **model_keys) -> torch.nn.Module:
    """One FFN block built through the real recipe path (a one-layer model's FFN)."""
    model = {"vocab_size": 8, "d_model": args.d_model, "n_layers": 1, "n_heads": 1, "max_seq_len": 8, "ffn": spec,
             **model_keys}
    return build(recipe_from_dict({"model": model})).blocks[0].ffn


def naive_loop(moe, x: torch.Tensor) -> torch.Tensor:
    """The usual reference implementation: per expert, find its tokens, run it, add them back."""
    route = moe.router(x)
    w_ug, w_d = moe.experts.up_gate.linear.weight, moe.experts.down.linear.weight
    y = torch.zeros_like(x)
    for e in range(moe.num_experts):
        token, slot = torch.where(route.experts == e)
        gate, up = F.linear(x[token], w_ug[e]).chunk(2, -1)
        out = F.linear(F.silu(gate) * up, w_d[e]) * route.weights[token, slot, None]
        y.index_add_(0, token, out)
    return y


def per_expert(moe):
    """The MoE layer with every expert projection run one expert at a time (ExpertProjection.grouped off)."""
    projections = [m for m in moe.modules() if isinstance(m, ExpertProjection)]

    def run(x: torch.Tensor) -> torch.Tensor:
        for m in projections:
            m.grouped = False
        try:
            return moe(x)
        finally:
            for m in projections:
                m.grouped = True
    return run


def cases(args, weights: str) -> dict:
    """{name: (fn, params)}: the MoE layer, the dense FFN of equal activated FLOPs, the per-expert baseline."""
    E, k, H = args.experts, args.top_k, args.hidden
    model = {} if weights == "fp" else {"weights": {"kind": weights},
                                        "sparsity": {"kind": "topk", "keep": args.keep}}
    expert = {"kind": "glu", "hidden": H} if weights == "fp" else {"kind": "glu", "hidden": H, "activation": "relu2"}
    moe = ffn(args, {"kind": "moe", "num_experts": E, "top_k": k, "backend": args.backend, "expert": expert}, **model)
    dense = ffn(args, {**expert, "hidden": k * H}, **model)
    params = list(moe.parameters())
    baseline = ("naive_loop", lambda x: naive_loop(moe, x)) if weights == "fp" else ("per_expert", per_expert(moe))
    return {"moe": (moe, params), "dense": (dense, list(dense.parameters())), baseline[0]: (baseline[1], params)}


def time_fwd_bwd(cases: dict, x: torch.Tensor, repeats: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and process CPU seconds of forward + backward per case and round. Cases run interleaved
    (one warm-up round first) so that load from other processes, or the host's, hits a round's cases
    alike; the CPU time is what the work costs whatever the load (at one thread: the uncontended time)."""
    grad = torch.randn_like(x)
    wall: dict[str, list[float]] = {name: [] for name in cases}
    cpu: dict[str, list[float]] = {name: [] for name in cases}
    for i in range(repeats + 1):
        for name, (fn, params) in cases.items():
            for p in params:
                p.grad = None
            t, c = time.perf_counter(), time.process_time()
            fn(x).backward(grad)
            if i:
                wall[name].append(time.perf_counter() - t)
                cpu[name].append(time.process_time() - c)
    return wall, cpu


def paired_ratio(times: dict[str, list[float]], name: str) -> float:
    """Median over rounds of `name`'s time over dense's in the same round (a paired statistic: a slow
    stretch of the machine slows both sides of a round, so it cancels)."""
    return statistics.median(t / d for t, d in zip(times[name], times["dense"]))


def bandwidth() -> float:
    """Measured copy bandwidth in bytes/s (read + write of a 64 MiB buffer)."""
    a = torch.empty(16 << 20)
    b = torch.empty_like(a)
    b.copy_(a)
    t = time.perf_counter()
    for _ in range(5):
        b.copy_(a)
    return 5 * 2 * a.numel() * a.element_size() / (time.perf_counter() - t)


def run(args) -> int:
    torch.manual_seed(args.seed)
    apply_threads(args)
    T, D, E, k, H = args.tokens, args.d_model, args.experts, args.top_k, args.hidden
    x = torch.randn(T, D, requires_grad=True)
    flops = 3 * 2 * T * k * 3 * D * H  # fwd + 2× bwd, three D×H matmuls per chosen expert
    # bytes floor: expert weights read in fwd, dgrad and wgrad, weight grads written, x/y/dy/dx once
    moved = 4 * (4 * E * 3 * D * H + 4 * T * D)
    bw = bandwidth()
    rows = {}
    for weights in args.weights:
        layer = cases(args, weights)
        walls, cpus = time_fwd_bwd(layer, x, args.repeats)
        results, cpu = {n: min(t) for n, t in walls.items()}, {n: min(t) for n, t in cpus.items()}
        rows[weights] = {"backend": layer["moe"][0].backend.name, "seconds": results, "cpu_seconds": cpu,
                         "ratio_vs_dense": {n: t / results["dense"] for n, t in results.items()},
                         "cpu_ratio_vs_dense": {n: t / cpu["dense"] for n, t in cpu.items()},
                         "paired_ratio_vs_dense": {n: paired_ratio(walls, n) for n in walls},
                         "gflops_per_s": {n: flops / t / 1e9 for n, t in results.items()}}
    report = {"shape": {"tokens": T, "d_model": D, "experts": E, "top_k": k, "hidden": H, "keep": args.keep},
              "weights": rows, "bandwidth_gb_s": bw / 1e9, "bytes_floor_seconds": moved / bw,
              "threads": torch.get_num_threads()}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"MoE fwd+bwd  T={T} D={D} E={E} top-{k} hidden={H}  threads={report['threads']}")
    for weights, row in rows.items():
        what = ("full-precision SwiGLU experts" if weights == "fp"
                else f"BitNet b1.58 ReLU²GLU experts, top-K keep {args.keep}")
        print(f" {what}  (backend {row['backend']}; dense: the same kind with hidden {k * H})")
        for n, t in row["seconds"].items():
            print(f"  {n:<11} {t * 1e3:9.1f} ms   ×{row['ratio_vs_dense'][n]:.3f} vs dense   "
                  f"(paired ×{row['paired_ratio_vs_dense'][n]:.3f})   {row['gflops_per_s'][n]:6.1f} GFLOP/s   "
                  f"CPU {row['cpu_seconds'][n] * 1e3:9.1f} ms ×{row['cpu_ratio_vs_dense'][n]:.3f}")
        base = next(n for n in row["seconds"] if n not in ("moe", "dense"))
        print(f"  moe is ×{row['seconds'][base] / row['seconds']['moe']:.2f} faster than {base} "
              f"(CPU time ×{row['cpu_seconds'][base] / row['cpu_seconds']['moe']:.2f})")
    print(" best of the rounds each; paired = median over rounds of (case / dense in the same round)")
    print(f" bytes floor {moved / bw * 1e3:9.1f} ms   ({moved / 1e6:.0f} MB at {bw / 1e9:.1f} GB/s measured)")
    return 0
