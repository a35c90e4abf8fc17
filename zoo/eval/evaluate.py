"""`evaluate(model, batches)`: validation loss, perplexity, measured sparsity, expert load, activated params."""

from __future__ import annotations

import torch

from zoo.contracts import FFN
from zoo.eval.perplexity import autocast, perplexity
from zoo.eval.sparsity import measure_sparsity
from zoo.model.accounting import account


def sparsity_summary(model, inputs: list[torch.Tensor]) -> dict:
    """Measured activation sparsity on `inputs` (token ids): overall, per role, the paper's columns, per layer."""
    table = measure_sparsity(model, inputs)
    return {"overall": table.overall(), "by_role": table.by_role(), "paper": table.paper(),
            "by_layer": table.by_layer()}


@torch.no_grad()
def evaluate(model, batches: list[tuple[torch.Tensor, torch.Tensor]], precision: str = "fp32") -> dict:
    """Everything `zoo eval` reports for `model` on `batches` of (inputs, targets)."""
    tokens_per_expert: dict[str, torch.Tensor] = {}
    entropy: dict[str, list[float]] = {}  # per forward: (mean router entropy, tokens)
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, FFN):  # a routed FFN reports its per-forward statistics

            def add(mod, args, out, name=name):
                stats = mod.routing_stats()
                if stats is None:
                    return
                counts = stats["tokens_per_expert"].detach().cpu().double()
                tokens_per_expert[name] = tokens_per_expert.get(name, 0) + counts
                tokens = args[0].numel() / args[0].shape[-1]
                acc = entropy.setdefault(name, [0.0, 0.0])
                acc[0] += float(stats["router_entropy"]) * tokens
                acc[1] += tokens
            hooks.append(module.register_forward_hook(add))
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    try:
        for x, y in batches:
            with autocast(precision, device):
                loss = model(x.to(device), y.to(device)).loss
            total += float(loss) * y.numel()
            count += y.numel()
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    loss = total / max(count, 1)
    experts = []
    for name, counts in tokens_per_expert.items():
        load = counts / counts.sum().clamp(min=1)
        experts.append({"module": name, "load": [round(float(v), 4) for v in load],
                        "load_cv": float(load.std(unbiased=False) / load.mean()), "max_load": float(load.max()),
                        "router_entropy": entropy[name][0] / max(entropy[name][1], 1)})
    return {
        "val_loss": loss,
        "val_ppl": perplexity(loss),
        "tokens": count,
        "sparsity": sparsity_summary(model, [x for x, _ in batches]),
        "expert_load": experts,
        "accounting": account(model, seq_len=batches[0][0].shape[1] if batches else None).to_dict(),
    }
