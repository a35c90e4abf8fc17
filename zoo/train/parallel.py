"""The `[parallel]` section: data-parallel training on torch.distributed (DDP or FSDP2) under torchrun.

Launched without torchrun (no WORLD_SIZE in the environment) training is the single-process path,
whatever the section says. Under torchrun every rank reads a disjoint slice of each global batch
(train.batch_size is the global batch), gradients are averaged over ranks, and only rank 0 writes
metrics, the progress bar and checkpoints. See docs/distributed.md.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

from zoo.errors import RecipeError
from zoo.recipe.schema import param


@dataclass(frozen=True)
class ParallelConfig:
    """How the ranks of a torchrun launch share the training work."""

    strategy: Literal["none", "ddp", "fsdp"] = param(
        "none", "data parallelism under torchrun: ddp (replicated weights) or fsdp (FSDP2, sharded weights)")
    backend: Literal["auto", "gloo", "nccl"] = param(
        "auto", "torch.distributed backend; auto = gloo (the training loop runs on the CPU)")


class Parallel:
    """This process's place in the launch: rank, world size, and what differs from a single process."""

    def __init__(self, strategy: str = "none", rank: int = 0, world: int = 1):
        self.strategy, self.rank, self.world = strategy, rank, world
        self.main = rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module to run forward/backward through (DDP wrapper, or the model sharded in place)."""
        if self.strategy == "ddp":
            return nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)  # MoE: idle experts
        if self.strategy == "fsdp":
            from torch.distributed.fsdp import fully_shard

            for block in model.blocks:
                fully_shard(block)
            fully_shard(model)
        return model

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global micro-batch."""
        n = x.shape[0] // self.world
        return x[self.rank * n:(self.rank + 1) * n]

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Average per-rank scalars (each rank's mean over an equal share of the batch) over all ranks."""
        if self.world == 1 or not values:
            return values
        t = torch.tensor(list(values.values()), dtype=torch.float64)
        dist.all_reduce(t)
        return dict(zip(values, (t / self.world).tolist()))

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """The whole model's tensors on the CPU (gathered from the shards under FSDP); None = model.state_dict()."""
        if self.strategy != "fsdp" or self.world == 1:
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def optimizer_state(self, opt: torch.optim.Optimizer) -> dict:
        """opt.state_dict() as one process has it: FSDP2's sharded moments gathered (every rank, in one order)."""
        sd = opt.state_dict()
        return {"state": {i: {k: full(v) for k, v in sorted(sd["state"][i].items())} for i in sorted(sd["state"])},
                "param_groups": sd["param_groups"]}

    def optimizer_loader(self, opt: torch.optim.Optimizer) -> Callable[[dict], None]:
        """A function loading a single-process opt.state_dict() into `opt` (moments sharded like their weights)."""
        from torch.distributed.tensor import DTensor, distribute_tensor

        params = [p for g in opt.param_groups for p in g["params"]]

        def load(sd: dict) -> None:
            for i, st in sorted(sd["state"].items()):  # every rank read the whole state: it keeps its slice
                p = params[i]
                if isinstance(p, DTensor):
                    sd["state"][i] = {k: distribute_tensor(v, p.device_mesh, p.placements, src_data_rank=None)
                                      if isinstance(v, torch.Tensor) and v.shape == p.shape else v
                                      for k, v in st.items()}
            opt.load_state_dict(sd)
        return load

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP2 gradients, norms) as a plain tensor; a plain tensor as is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def setup(recipe) -> Parallel:
    """Join the torchrun process group the environment describes; a plain process is rank 0 of 1."""
    cfg, src = recipe.parallel, recipe.source or None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Parallel()
    if cfg.strategy == "none":
        raise RecipeError(f"launched on {world} processes (WORLD_SIZE={world}) but parallel.strategy is 'none'; "
                          "set it to 'ddp' or 'fsdp'", file=src, path="parallel.strategy")
    per_step = recipe.train.grad_accum * world
    if recipe.train.batch_size % per_step:
        raise RecipeError(f"train.batch_size={recipe.train.batch_size} (the global batch) must be divisible by "
                          f"grad_accum x world size = {recipe.train.grad_accum} x {world}",
                          file=src, path="train.batch_size")
    if cfg.backend == "nccl":
        raise RecipeError("nccl needs the model on CUDA, and the training loop runs on the CPU; "
                          "use backend 'gloo' or 'auto'", file=src, path="parallel.backend")
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return Parallel(cfg.strategy, dist.get_rank(), world)
