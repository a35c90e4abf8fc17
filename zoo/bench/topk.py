"""Q-Sparse training step (top-K on every projection input, STE) against the same dense step."""

from __future__ import annotations

import json
import statistics
import time

import torch

import zoo
from zoo.bench._measure import add_threads_argument, apply_threads


def add_arguments(p) -> None:
    p.add_argument("--d-model", type=int, default=192, help="model width (default: %(default)s)")
    p.add_argument("--hidden", type=int, default=512, help="GLU hidden width (default: %(default)s)")
    p.add_argument("--layers", type=int, default=4, help="transformer blocks (default: %(default)s)")
    p.add_argument("--heads", type=int, default=6, help="attention heads (default: %(default)s)")
    p.add_argument("--batch", type=int, default=16, help="sequences per step (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default: %(default)s)")
    p.add_argument("--keep", type=float, default=0.5, help="top-K keep fraction (default: %(default)s)")
    p.add_argument("--kind", default="topk", choices=["topk", "block_topk"],
                   help="sparsity kind; block_topk keeps 16 of each 32 (default: %(default)s)")
    p.add_argument("--activation", default="silu", help="GLU activation of both models (default: %(default)s)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per model, after 2 warm-up steps "
                                                         "(default: %(default)s)")
    add_threads_argument(p)


def _recipe(args, sparsity: str) -> zoo.Recipe:
    return zoo.loads_recipe(f"""
[model]
vocab_size = 256
d_model = {args.d_model}
n_layers = {args.layers}
n_heads = {args.heads}
max_seq_len = {args.seq_len}
ffn = {{ kind = "glu", hidden = {args.hidden}, activation = "{args.activation}" }}
sparsity = {sparsity}
""", source="<bench topk>")


def _step(model, opt, idx) -> None:
    loss = model(idx[:, :-1], idx[:, 1:]).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _bandwidth() -> float:
    """Measured copy bandwidth in bytes/s (read + write of a 64 MiB buffer)."""
    src = torch.empty(16 << 20)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t)
    return 2 * src.numel() * 4 / min(times)


def run(args) -> int:
    apply_threads(args)
    sparse_spec = (f'{{ kind = "topk", keep = {args.keep} }}' if args.kind == "topk"
                   else '{ kind = "block_topk", n = 16, m = 32 }')
    torch.manual_seed(0)
    models = {"dense": zoo.build(_recipe(args, '"none"')), "qsparse": zoo.build(_recipe(args, sparse_spec))}
    models["qsparse"].load_state_dict(models["dense"].state_dict())
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-3) for k, m in models.items()}
    idx = torch.randint(0, 256, (args.batch, args.seq_len + 1))
    times: dict[str, list[float]] = {k: [] for k in models}
    for i in range(args.steps + 2):
        for k in models:  # interleaved, so that load from other processes hits both alike
            t = time.perf_counter()
            _step(models[k], opts[k], idx)
            if i >= 2:
                times[k].append(time.perf_counter() - t)
    dense, sparse = statistics.median(times["dense"]), statistics.median(times["qsparse"])
    # floor of the extra work: each masked input is read and the masked copy written once (fp32)
    tokens = args.batch * args.seq_len
    widths = args.layers * (3 * args.d_model + args.hidden)
    floor = dense + 2 * 4 * tokens * widths / _bandwidth()
    result = {"tokens_per_step": tokens, "dense_step_s": dense, "qsparse_step_s": sparse,
              "ratio": sparse / dense, "floor_step_s": floor, "floor_ratio": floor / dense,
              "threads": torch.get_num_threads(), "kind": args.kind,
              "keep": args.keep if args.kind == "topk" else 0.5, "activation": args.activation}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"train step, {tokens} tokens, d_model {args.d_model}, hidden {args.hidden}, {args.layers} layers, "
              f"{torch.get_num_threads()} threads")
        print(f"  dense                 {dense * 1e3:9.1f} ms")
        label = f"topk keep {args.keep}" if args.kind == "topk" else "block_topk 16:32"
        print(f"  {label:<21} {sparse * 1e3:9.1f} ms   ratio x{sparse / dense:.3f}")
        print(f"  floor (mask traffic)  {floor * 1e3:9.1f} ms   ratio x{floor / dense:.3f}")
    return 0
