"""The run's sections of a recipe: `[train]`, `[data]` and `[parallel]` (`[optim]` is a block: zoo/train/optim.py;
`[model]` sits beside the model: zoo/model/config.py). Read by zoo/train/ (loop.py, parallel.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from zoo.schema import BlockSpec, Invalid, ModelStr, param, slot_field


@dataclass(frozen=True)
class DistillConfig:
    """Distillation: loss = cross-entropy + weight · T² · KL(teacher_T ‖ student_T), at temperature T."""

    teacher: ModelStr = param(doc="the teacher: a catalogue model, run or checkpoint folder (same vocabulary)")
    weight: float = param(1.0, "weight of the KL term (0: plain training)", ge=0)
    temperature: float = param(1.0, "softmax temperature of both distributions", gt=0)


@dataclass(frozen=True)
class TrainConfig:
    """How long and how to train."""

    steps: int = param(500, "optimizer steps", ge=1, le=1 << 40)
    batch_size: int = param(16, "sequences per optimizer step (split into grad_accum micro-batches)",
                            ge=1, le=1 << 20)
    seq_len: int = param(128, "tokens per sequence", ge=2, le=1 << 20)
    grad_accum: int = param(1, "micro-batches per optimizer step", ge=1, le=1 << 16)
    grad_clip: float = param(1.0, "max global gradient norm (0 disables)", ge=0)
    seed: int = param(0, "random seed for init, data order and dropout", ge=0)
    precision: Literal["fp32", "bf16"] = param("fp32", "autocast precision of the forward pass")
    device: Literal["auto", "cpu", "cuda"] = param(
        "auto", "where the model and batches live: auto = cuda if available (on several processes: the "
                "LOCAL_RANK-th GPU), else cpu")
    eval_every: int = param(100, "validate every N steps (0 = only at the end)", ge=0)
    eval_batches: int = param(8, "validation batches per evaluation", ge=1)
    log_every: int = param(10, "write a metrics line every N steps", ge=1)
    ckpt_every: int = param(0, "checkpoint every N steps (0 = only at the end)", ge=0)
    keep_last: int = param(2, "checkpoints kept on disk", ge=1)
    compile: bool = param(False, "wrap the model in torch.compile")
    init_from: ModelStr | None = param(None, "start from the weights of this zoo checkpoint (or run) folder or "
                                             "catalogue model; the recipe may differ in sparsity, the tensors must "
                                             "match")
    distill: DistillConfig | None = param(None, "distil from a teacher model (e.g. the dense original of a retrofit)")
    schedule: BlockSpec = slot_field("schedule", {"kind": "cosine"}, "learning-rate / weight-decay schedule")
    layer_grad_norms: bool = param(False, "log the gradient norm of every transformer block")
    tensorboard: bool = param(False, "also log to TensorBoard (needs the tensorboard package)")

    def check(self) -> None:
        if self.batch_size % self.grad_accum:
            raise Invalid("grad_accum", f"grad_accum={self.grad_accum} must divide batch_size={self.batch_size}")


@dataclass(frozen=True)
class DataConfig:
    """Where tokens come from."""

    dataset: BlockSpec = slot_field("dataset", {"kind": "kjv"}, "text source")
    tokenizer: BlockSpec = slot_field("tokenizer", {"kind": "bytes"}, "text <-> token ids")
    val_fraction: float = param(0.05, "fraction of the text held out for validation", gt=0, lt=1)


@dataclass(frozen=True)
class ParallelConfig:
    """How the ranks of a launch on several processes (`zoo train --nproc-per-node`, torchrun) share the work."""

    strategy: Literal["none", "ddp", "fsdp"] = param(
        "none", "data parallelism on several processes: ddp (replicated weights) or fsdp (FSDP2, sharded weights)")
    backend: Literal["auto", "gloo", "nccl"] = param(
        "auto", "torch.distributed backend; auto = nccl when train.device is CUDA, else gloo")
    expert_parallel: int = param(
        1, "split every MoE layer's routed experts over groups of this many ranks (1 = every rank holds all); "
           "needs strategy ddp, must divide the world size and every layer's num_experts", ge=1, le=1 << 14)
