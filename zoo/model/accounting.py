"""Parameters and FLOPs per token: total, embedding, non-embedding, and *activated*.

A projection whose input keeps a fraction r of its entries reads r of its weight columns per
token; a module with a `token_fraction` attribute (e.g. the expert list of a MoE layer, top_k /
num_experts) scales everything below it. Works on meta-device models (nothing allocated).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field

from torch import nn

from zoo.model.projection import Projection


@dataclass
class Accounting:
    total_params: int
    embedding_params: int
    non_embedding_params: int
    activated_params: float
    flops_per_token: float
    seq_len: int
    projection_params: int
    activated_projection_params: float
    by_role: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def sparsity(self) -> float:
        """Overall sparsity of the projections, as the paper counts it: 1 - activated / total."""
        return 1.0 - self.activated_projection_params / max(self.projection_params, 1)

    def to_dict(self) -> dict:
        return {**asdict(self), "sparsity": self.sparsity}


def account(model: nn.Module, seq_len: int | None = None) -> Accounting:
    """Count `model` (a zoo Transformer). FLOPs are forward, per token, at context `seq_len`."""
    cfg = model.config
    seq_len = seq_len or cfg.max_seq_len
    seen: set[int] = set()
    roles: dict[str, dict[str, float]] = defaultdict(lambda: {"params": 0, "activated": 0.0})
    totals = {"all": 0, "proj": 0, "proj_act": 0.0, "other_act": 0.0}

    def params_of(module: nn.Module) -> int:
        n = 0
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                n += p.numel()
        return n

    def walk(module: nn.Module, mult: float) -> None:
        mult *= float(getattr(module, "token_fraction", 1.0))
        if isinstance(module, Projection):
            params_of(module)  # mark as seen; counted by shape (packed storage differs)
            n = module.weight_count
            bias = getattr(module.linear, "bias", None)
            nb = bias.numel() if isinstance(bias, nn.Parameter) else 0
            act = (n * module.keep + nb) * mult
            roles[module.role]["params"] += n + nb
            roles[module.role]["activated"] += act
            totals["all"] += n + nb
            totals["proj"] += n + nb
            totals["proj_act"] += act
            return
        own = sum(p.numel() for p in module.parameters(recurse=False) if id(p) not in seen)
        for p in module.parameters(recurse=False):
            seen.add(id(p))
        totals["all"] += own
        totals["other_act"] += own * mult
        for child in module.children():
            walk(child, mult)

    embedding = params_of(model.embed)
    head = 0 if cfg.tie_embeddings else params_of(model.head)
    for name, child in model.named_children():
        if name not in ("embed", "head"):
            walk(child, 1.0)
    activated = totals["proj_act"] + totals["other_act"]
    attn = 4 * cfg.n_layers * seq_len * cfg.n_heads * cfg.head_size
    flops = 2 * totals["proj_act"] + 2 * cfg.d_model * cfg.vocab_size + attn
    return Accounting(
        total_params=embedding + head + totals["all"],
        embedding_params=embedding + head,
        non_embedding_params=totals["all"],
        activated_params=activated,
        flops_per_token=flops,
        seq_len=seq_len,
        projection_params=totals["proj"],
        activated_projection_params=totals["proj_act"],
        by_role={k: dict(v) for k, v in sorted(roles.items())},
    )
