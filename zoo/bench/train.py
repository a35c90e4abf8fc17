"""zoo dense training step against transformers' LlamaForCausalLM of the same configuration."""

from __future__ import annotations

import json
import statistics
import time

import torch

import zoo
from zoo.bench._measure import add_threads_argument, apply_threads
from zoo.eval.perplexity import autocast
from zoo.io.arch.llama import Llama
from zoo.io.hf import HFConfig, exportable, scatter
from zoo.recipe.loader import add_set_argument
from zoo.recipe.recipe import BUNDLED
from zoo.registry import get_registry


def add_arguments(p) -> None:
    p.add_argument("--recipe", default=str(BUNDLED / "tiny" / "dense.toml"),
                   help="a dense LLaMA-like recipe (default: tiny)")
    add_set_argument(p, "a key of the recipe")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default: train.batch_size)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: train.seq_len)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per model (after 3 warm-up steps)")
    add_threads_argument(p)


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


def hf_twin(model, recipe):
    """transformers' LlamaForCausalLM of the recipe's configuration, holding `model`'s weights (same function)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    exportable(recipe)
    config = Llama().config(recipe.model)
    cfg = {k: v for k, v in config.items() if k not in ("architectures", "model_type", "dtype")}
    twin = LlamaForCausalLM(LlamaConfig(**cfg, attn_implementation="sdpa"))
    twin.to(next(model.parameters()).dtype)
    state = scatter(Llama().rules(HFConfig(config, "<bench>")),
                    {k: v.detach() for k, v in model.state_dict().items()})
    missing, unexpected = twin.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if recipe.model.tie_embeddings else set()
    assert not unexpected and set(missing) <= tied, (missing, unexpected)
    return twin


def run(args) -> int:
    recipe = zoo.load_recipe(args.recipe, args.overrides)
    apply_threads(args)

    torch.manual_seed(recipe.train.seed)
    ours = zoo.build(recipe)
    theirs = hf_twin(ours, recipe)
    batch, seq = args.batch or recipe.train.batch_size, args.seq_len or recipe.train.seq_len
    idx = torch.randint(0, recipe.model.vocab_size, (batch, seq + 1))
    x, y = idx[:, :-1], idx[:, 1:]
    precision = recipe.train.precision

    def loss_ours():
        with autocast(precision, "cpu"):
            return ours(x, y).loss

    def loss_theirs():
        with autocast(precision, "cpu"):
            logits = theirs(input_ids=x, use_cache=False).logits  # no KV cache while training
        return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())

    losses = {"zoo": loss_ours, "transformers": loss_theirs}
    with torch.no_grad():  # same weights, same function: the two losses agree before any step
        same = abs(float(loss_ours()) - float(loss_theirs()))
    optimizer = get_registry().get("optimizer", recipe.optim.kind).factory  # zoo train's optimizer, for both
    opts = {"zoo": optimizer(recipe.optim.config, ours.parameters()),
            "transformers": optimizer(recipe.optim.config, theirs.parameters())}
    wall: dict[str, list[float]] = {k: [] for k in losses}
    cpu: dict[str, list[float]] = {k: [] for k in losses}
    for i in range(args.steps + 3):
        for k, loss in losses.items():  # interleaved: other processes' load hits both alike
            t, c = time.perf_counter(), time.process_time()
            loss().backward()
            opts[k].step()
            opts[k].zero_grad(set_to_none=True)
            if i >= 3:
                wall[k].append(time.perf_counter() - t)
                cpu[k].append(time.process_time() - c)
    tokens = batch * seq
    zs, hs = statistics.median(wall["zoo"]), statistics.median(wall["transformers"])
    zc, hc = statistics.median(cpu["zoo"]), statistics.median(cpu["transformers"])
    train_flops = 3 * zoo.account(ours, seq_len=seq).flops_per_token * tokens
    floor = train_flops / _matmul_flops()
    n_ours, n_theirs = (sum(p.numel() for p in m.parameters()) for m in (ours, theirs))
    result = {"tokens_per_step": tokens, "params_zoo": n_ours, "params_transformers": n_theirs,
              "zoo_step_s": zs, "transformers_step_s": hs, "zoo_tokens_per_s": tokens / zs,
              "transformers_tokens_per_s": tokens / hs, "ratio_throughput_zoo_over_transformers": hs / zs,
              "zoo_cpu_s": zc, "transformers_cpu_s": hc, "ratio_cpu_time": hc / zc, "loss_difference": same,
              "floor_step_s": floor, "zoo_of_floor": floor / zs, "threads": torch.get_num_threads(),
              "steps": args.steps, "precision": precision, "dtype": recipe.model.dtype}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    m = recipe.model
    print(f"train step (fwd+bwd+{recipe.optim.kind} of the recipe), {batch}x{seq} = {tokens} tokens, "
          f"d_model {m.d_model}, {m.n_layers} layers, {n_ours:,} params, {m.dtype}, precision {precision}, "
          f"{torch.get_num_threads()} threads; median of {args.steps} interleaved steps")
    print(f"  same weights, same function: |loss zoo - loss transformers| = {same:.2e}")
    print(f"  zoo                       {zs * 1e3:9.1f} ms  {tokens / zs:9.0f} tok/s  (CPU time {zc * 1e3:.1f} ms)")
    print(f"  transformers LlamaForCLM  {hs * 1e3:9.1f} ms  {tokens / hs:9.0f} tok/s  (CPU time {hc * 1e3:.1f} ms)")
    print(f"  throughput ratio zoo / transformers: x{hs / zs:.3f} (wall), x{hc / zc:.3f} (process CPU time)")
    print(f"  floor (3 x forward FLOPs / measured matmul FLOP/s) {floor * 1e3:.1f} ms; zoo at {floor / zs:.0%} of it")
    return 0
