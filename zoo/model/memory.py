"""Memory a recipe needs, estimated before anything is allocated, and the check that refuses a model
that cannot fit.

Training (per rank): weights as held, one gradient per trainable parameter, AdamW's two moments,
the bf16 copies autocast makes of the projection weights, and the activations backward keeps at the
micro-batch (train.batch_size / grad_accum / ranks) × train.seq_len. Inference: the weights in their
inference form (BitNet: packed), the KV cache at batch 1 × model.max_seq_len, and one layer's
activations at that length.

Activations are counted per token from the built (meta) model: every projection keeps its input and
its output (× the rows it runs on: top_k of every token for a routed expert, counted through
`token_fraction`), every other module with parameters (norms) keeps its input, attention keeps the
rotated q, k and its output, and the head keeps the logits in float32 and their log-softmax. Weight
copies: autocast's bf16 copies, and the quantized copy a weights kind with a packed inference form
(BitNet) trains through. Measured against the tensors autograd saves on every tiny recipe, fp32 and
bf16 (tests/test_memory.py), activations plus copies are within 25%.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass

import torch
from torch import nn

from zoo.contracts import FFN
from zoo.errors import ZooError
from zoo.model.accounting import account
from zoo.model.projection import Projection

GiB = 1 << 30


class OutOfMemory(ZooError):
    """A model (or its training) that does not fit in the memory of the device it is asked to run on."""


@dataclass
class MemoryEstimate:
    """Bytes, per rank. `train` and `inference` are the totals compared with what the device has free."""

    weights: int
    gradients: int
    optimizer_states: int
    weight_copies: int
    activations: int
    activations_per_token: int
    micro_batch: int
    seq_len: int
    ranks: int
    inference_weights: int
    kv_cache: int
    inference_activations: int

    @property
    def sharded(self) -> int:
        """What FSDP divides over ranks: weights, gradients and optimizer states."""
        return self.weights + self.gradients + self.optimizer_states

    @property
    def train(self) -> int:
        return self.sharded + self.weight_copies + self.activations

    @property
    def inference(self) -> int:
        return self.inference_weights + self.kv_cache + self.inference_activations

    def to_dict(self) -> dict:
        return {**asdict(self), "train": self.train, "inference": self.inference}


def activation_elements_per_token(model: nn.Module) -> tuple[float, float, int]:
    """(elements backward keeps per token of a training batch, of them in the head and embedding,
    weights of the projections outside the routed experts)."""
    cfg = model.config
    total, dense = 0.0, 0

    def walk(module: nn.Module, mult: float) -> None:
        nonlocal total, dense
        if isinstance(module, FFN):
            mult *= float(module.token_fraction)
        if isinstance(module, Projection):
            experts = module.num_experts
            total += mult * experts * (module.in_features + module.out_features)
            dense += module.weight_count if experts == 1 else 0
            return
        own = list(module.parameters(recurse=False))
        matrices = [p for p in own if p.dim() - getattr(p, "expert_dims", 0) >= 2]
        if matrices:  # a linear layer (a router) keeps its input and its output
            total += mult * sum(p.shape[-1] + p.shape[-2] for p in matrices)
        elif own:  # a norm keeps its input: as wide as its gain (a scalar gain: the residual stream)
            total += mult * max(p.shape[-1] if p.dim() else cfg.d_model for p in own)
        for child in module.children():
            walk(child, mult)

    for name, child in model.named_children():
        if name not in ("embed", "head"):
            walk(child, 1.0)
    attention = cfg.n_layers * (2 * cfg.n_heads + cfg.kv_heads) * cfg.head_size  # rotated q, k; output
    head = cfg.d_model + 2 * cfg.vocab_size  # embedding output; float32 logits and their log-softmax
    return total + attention + head, head, dense


def kv_cache_bytes(model: nn.Module, batch: int = 1) -> int:
    c = model.config
    return 2 * c.n_layers * batch * c.kv_heads * c.max_seq_len * c.head_size * param_bytes(model)


def param_bytes(model: nn.Module) -> int:
    return next(model.parameters()).element_size()


def estimate(model: nn.Module, micro_batch: int, seq_len: int, precision: str = "fp32",
             ranks: int = 1, sharded: bool = False) -> MemoryEstimate:
    """Memory per rank to train `model` (a zoo Transformer, meta or real) and to run it for inference."""
    acc = account(model, seq_len=seq_len)
    cfg = model.config
    held = acc.projection_bytes + acc.embedding_bytes + acc.other_bytes
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    share = ranks if sharded else 1
    per_token, head, dense = activation_elements_per_token(model)
    low = precision == "bf16" and param_bytes(model) > 2
    # under bf16 autocast a matmul keeps a bf16 copy of its float32 input and a bf16 output: 3.5 bytes an
    # element on average, measured; the loss stays float32
    act_bytes = 3.5 if low else param_bytes(model)
    per_token_bytes = (per_token - head) * act_bytes + head * 4
    # copies of weights backward keeps: autocast's bf16 copies of the matmul weights outside the grouped
    # expert matmuls; a weights kind with a packed inference form trains through a quantized copy of all
    copies = 2 * (dense + cfg.vocab_size * cfg.d_model) if low else 0
    if acc.projection_bytes_inference < acc.projection_bytes:
        copies = (2 if low else param_bytes(model)) * dense + param_bytes(model) * (acc.projection_params - dense)
    layer = (per_token - head) / cfg.n_layers * param_bytes(model)  # one layer's working set, no grad kept
    return MemoryEstimate(
        weights=math.ceil(held / share),
        gradients=math.ceil(trainable / share),
        optimizer_states=math.ceil(2 * trainable / share),
        weight_copies=copies,
        activations=math.ceil(per_token_bytes * micro_batch * seq_len),
        activations_per_token=math.ceil(per_token_bytes),
        micro_batch=micro_batch,
        seq_len=seq_len,
        ranks=ranks,
        inference_weights=acc.projection_bytes_inference + acc.embedding_bytes + acc.other_bytes,
        kv_cache=kv_cache_bytes(model),
        inference_activations=math.ceil((layer + head * 4) * cfg.max_seq_len),
    )


def available(device: torch.device | str) -> int:
    """Bytes free on `device`: CUDA's free memory, or the host's MemAvailable (/proc/meminfo)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def gib(n: float) -> str:
    """Bytes for a person: 515 GiB, 21.5 MiB, 3 KiB."""
    for unit, scale in (("GiB", GiB), ("MiB", 1 << 20)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}" if n < 1000 * scale else f"{n / scale:,.0f} {unit}"
    return f"{n / 1024:.3g} KiB"


def where(device: torch.device | str) -> str:
    device = torch.device(device)
    return f"{device} has {gib(available(device))} free" if device.type == "cuda" else \
        f"this machine has {gib(available(device))} available"


def check_weights_fit(model: nn.Module, device: torch.device | str, source: str) -> None:
    """Refuse to allocate `model`'s weights (`model` built on the meta device) where they cannot fit."""
    need = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    free = available(device)
    if need > free:
        raise OutOfMemory(f"{source}: the model's weights need {gib(need)} but {where(device)}; "
                          "use a smaller model (model.d_model, model.n_layers, model.vocab_size, the FFN's hidden)")


def check_training_fits(model: nn.Module, recipe, device: torch.device | str, ranks: int, strategy: str) -> \
        MemoryEstimate:
    """Refuse a training run (`model` built on the meta device) whose estimate exceeds the free memory."""
    cfg = recipe.train
    micro = max(1, cfg.batch_size // cfg.grad_accum // ranks)
    est = estimate(model, micro, cfg.seq_len, cfg.precision, ranks, sharded=strategy == "fsdp")
    free = available(device)
    if est.train <= free:
        return est
    fixed = est.weight_copies + est.activations
    advice = ["a smaller model"]
    if est.activations > free / 4:
        advice.append(f"a smaller micro-batch (more train.grad_accum; now {micro} × {cfg.seq_len} tokens)")
    if fixed < free:
        n = math.ceil(est.sharded * (1 if strategy == "fsdp" else ranks) / (free - fixed))
        if n > ranks:
            advice.append(f'[parallel] strategy = "fsdp" over {n} ranks of this size')
    raise OutOfMemory(
        f"{recipe.source or 'recipe'}: training needs an estimated {gib(est.train)} per rank (weights "
        f"{gib(est.weights)}, gradients {gib(est.gradients)}, AdamW states {gib(est.optimizer_states)}, "
        f"activations {gib(est.activations + est.weight_copies)}) but {where(device)}; use " + ", or ".join(advice))


def allocator_failure(err: BaseException, what: str) -> OutOfMemory | None:
    """The one-line error for an allocator failure (`torch.OutOfMemoryError`, the CPU allocator's
    "can't allocate"), or None for any other error."""
    text = str(err)
    if isinstance(err, (torch.OutOfMemoryError, MemoryError)) or (isinstance(err, RuntimeError) and (
            "can't allocate memory" in text or "DefaultCPUAllocator" in text)):
        first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
        return OutOfMemory(f"{what}: out of memory ({first}); use a smaller model or train.batch_size, more "
                           'train.grad_accum, or [parallel] strategy = "fsdp" over more ranks')
    return None
