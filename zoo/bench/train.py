"""zoo dense training step against transformers' LlamaForCausalLM of the same configuration."""

from __future__ import annotations

import json
import statistics
import time

import torch

import zoo
from zoo.cli.quickstart import RECIPES


def add_arguments(p) -> None:
    p.add_argument("--recipe", default=str(RECIPES / "dense.toml"), help="a dense LLaMA-like recipe (default: tiny)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=10, help="timed steps per model (after 2 warm-up steps)")


def _matmul_flops() -> float:
    """Measured fp32 matmul throughput (FLOP/s) of this machine now: the compute floor's denominator."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    times = []
    for _ in range(5):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * 1024**3 / min(times)


def run(args) -> int:
    recipe = zoo.load_recipe(args.recipe, args.overrides)  # before the slow import: a bad recipe fails at once
    from transformers import LlamaConfig, LlamaForCausalLM

    from zoo.io.hf import llama_config

    torch.manual_seed(0)
    ours = zoo.build(recipe)
    cfg = {k: v for k, v in llama_config(recipe.model).items() if k not in ("architectures", "model_type", "dtype")}
    theirs = LlamaForCausalLM(LlamaConfig(**cfg, attn_implementation="sdpa"))
    n_ours, n_theirs = (sum(p.numel() for p in m.parameters()) for m in (ours, theirs))
    idx = torch.randint(0, recipe.model.vocab_size, (args.batch, args.seq + 1))
    x, y = idx[:, :-1], idx[:, 1:]

    def loss_ours():
        return ours(x, y).loss

    def loss_theirs():
        return torch.nn.functional.cross_entropy(theirs(input_ids=x).logits.flatten(0, 1), y.flatten())

    losses = {"zoo": loss_ours, "transformers": loss_theirs}
    opts = {"zoo": torch.optim.AdamW(ours.parameters(), lr=1e-3),
            "transformers": torch.optim.AdamW(theirs.parameters(), lr=1e-3)}
    times: dict[str, list[float]] = {k: [] for k in losses}
    for i in range(args.steps + 2):
        for k, loss in losses.items():  # interleaved: other processes' load hits both alike
            t = time.perf_counter()
            loss().backward()
            opts[k].step()
            opts[k].zero_grad(set_to_none=True)
            if i >= 2:
                times[k].append(time.perf_counter() - t)
    tokens = args.batch * args.seq
    zs, hs = statistics.median(times["zoo"]), statistics.median(times["transformers"])
    train_flops = 3 * zoo.account(ours, seq_len=args.seq).flops_per_token * tokens
    floor = train_flops / _matmul_flops()
    result = {"tokens_per_step": tokens, "params_zoo": n_ours, "params_transformers": n_theirs,
              "zoo_step_s": zs, "transformers_step_s": hs, "zoo_tokens_per_s": tokens / zs,
              "transformers_tokens_per_s": tokens / hs, "ratio_throughput_zoo_over_transformers": hs / zs,
              "floor_step_s": floor, "zoo_of_floor": floor / zs, "threads": torch.get_num_threads()}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    m = recipe.model
    print(f"train step (fwd+bwd+AdamW), {tokens} tokens, d_model {m.d_model}, {m.n_layers} layers, "
          f"{n_ours:,} params, {torch.get_num_threads()} threads")
    print(f"  zoo                       {zs * 1e3:9.1f} ms  {tokens / zs:9.0f} tok/s")
    print(f"  transformers LlamaForCLM  {hs * 1e3:9.1f} ms  {tokens / hs:9.0f} tok/s")
    print(f"  throughput ratio zoo / transformers: x{hs / zs:.3f}")
    print(f"  floor (3 x forward FLOPs / measured matmul FLOP/s) {floor * 1e3:.1f} ms; zoo at {floor / zs:.0%} of it")
    return 0
