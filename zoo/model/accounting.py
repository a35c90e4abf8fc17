"""Parameters and FLOPs per token: total, embedding, non-embedding, and *activated*.

A projection whose input keeps a fraction r of its entries reads r of its weight columns per
token (`keep`, from its sparsity block's `keep_fraction`); an FFN's `token_fraction` (e.g. the
expert list of a MoE layer: top_k / num_experts) scales everything below it. Works on
meta-device models (nothing allocated).

Storage: the bytes of the projection weights as held now, in float32, and in inference form
(the weights block's `inference_nbytes()`: BitNet counts its packed 2-bit storage, others their
tensors as held), apart from the embedding/head and the other (norm) tensors.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field

from torch import nn

from zoo.contracts import FFN
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
    projection_bytes: int = 0
    projection_bytes_fp32: int = 0
    projection_bytes_inference: int = 0
    embedding_bytes: int = 0
    other_bytes: int = 0
    by_role: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def sparsity(self) -> float:
        """Overall sparsity of the projections, as the paper counts it: 1 - activated / total."""
        return 1.0 - self.activated_projection_params / max(self.projection_params, 1)

    @property
    def inference_storage_ratio(self) -> float:
        """Projection bytes in inference form / in float32 (1/16 is the 2-bit floor)."""
        return self.projection_bytes_inference / max(self.projection_bytes_fp32, 1)

    def to_dict(self) -> dict:
        return {**asdict(self), "sparsity": self.sparsity, "inference_storage_ratio": self.inference_storage_ratio}


def nbytes(tensors) -> int:
    """Bytes of the given tensors (works on meta tensors)."""
    return sum(t.numel() * t.element_size() for t in tensors)


def account(model: nn.Module, seq_len: int | None = None) -> Accounting:
    """Count `model` (a zoo Transformer). FLOPs are forward, per token, at context `seq_len`."""
    cfg = model.config
    seq_len = seq_len or cfg.max_seq_len
    seen: set[int] = set()
    roles: dict[str, dict[str, float]] = defaultdict(lambda: {"params": 0, "activated": 0.0})
    totals = {"all": 0, "proj": 0, "proj_act": 0.0, "other_act": 0.0}
    storage = {"proj": 0, "fp32": 0, "inference": 0, "other": 0}

    def params_of(module: nn.Module, recurse: bool = True) -> int:
        """Parameters of `module` not counted yet (their bytes go to the `other` storage)."""
        fresh = [p for p in module.parameters(recurse=recurse) if id(p) not in seen]
        seen.update(id(p) for p in fresh)
        storage["other"] += nbytes(fresh)
        return sum(p.numel() for p in fresh)

    def walk(module: nn.Module, mult: float) -> None:
        if isinstance(module, FFN):
            mult *= float(module.token_fraction)
        if isinstance(module, Projection):
            # the weight (and bias) are counted by shape: packed storage differs; other
            # tensors inside (e.g. BitNet's input norm) count as non-projection parameters
            weight = [*module.linear.parameters(recurse=False), *module.linear.buffers(recurse=False)]
            extra = params_of(module) - sum(p.numel() for p in module.linear.parameters(recurse=False))
            storage["other"] -= nbytes(module.linear.parameters(recurse=False))
            n = module.weight_count
            nb = module.bias_count
            act = (n * module.keep + nb) * mult
            roles[module.role]["params"] += n + nb
            roles[module.role]["activated"] += act
            totals["all"] += n + nb + extra
            totals["proj"] += n + nb
            totals["proj_act"] += act
            totals["other_act"] += extra * mult
            held = nbytes(weight)
            storage["proj"] += held
            storage["fp32"] += 4 * (n + nb)
            storage["inference"] += module.linear.inference_nbytes()
            return
        own = params_of(module, recurse=False)
        totals["all"] += own
        totals["other_act"] += own * mult
        for child in module.children():
            walk(child, mult)

    embedding = params_of(model.embed)
    head = 0 if cfg.tie_embeddings else params_of(model.head)
    embedding_bytes, storage["other"] = storage["other"], 0
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
        projection_bytes=storage["proj"],
        projection_bytes_fp32=storage["fp32"],
        projection_bytes_inference=storage["inference"],
        embedding_bytes=embedding_bytes,
        other_bytes=storage["other"],
        by_role={k: dict(v) for k, v in sorted(roles.items())},
    )
