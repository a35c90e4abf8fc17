"""The `[parallel]` section: data-parallel training on torch.distributed (DDP or FSDP2) under torchrun.

Launched without torchrun (no WORLD_SIZE in the environment) training is the single-process path,
whatever the section says. Under torchrun every rank reads a disjoint slice of each global batch
(train.batch_size is the global batch), gradients are averaged over ranks, and only rank 0 writes
metrics, the progress bar and checkpoints. With `expert_parallel = N` the routed experts of every
MoE layer are split over groups of N ranks (zoo.train.expert_parallel). See docs/distributed.md.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from zoo.errors import RecipeError
from zoo.train.expert_parallel import expert_groups, gather_experts, is_expert, shard_experts


class Parallel:
    """This process's place in the launch: rank, world size, and what differs from a single process."""

    def __init__(self, strategy: str = "none", rank: int = 0, world: int = 1, expert: int = 1,
                 expert_group=None, replica_group=None, source: str | None = None,
                 device: torch.device | None = None):
        self.strategy, self.rank, self.world, self.device = strategy, rank, world, device or torch.device("cpu")
        self.main = rank == 0
        self.expert, self.expert_group, self.replica_group, self.source = expert, expert_group, replica_group, source
        self.sharded = world > 1 and (strategy == "fsdp" or expert > 1)  # no rank holds the whole model

    def wrap(self, model: nn.Module) -> nn.Module:
        """Move the model to this rank's device; return the module to run forward/backward through (DDP
        wrapper, or the model sharded in place).

        Under expert parallelism there is no DDP wrapper (it would average the gradients of different
        experts): `reduce_gradients` averages every gradient after the backward instead.
        """
        model.to(self.device)
        if self.world == 1:
            return model
        if self.expert > 1:
            self._shard_experts(model)
            return model
        if self.strategy == "ddp":
            ids = [self.device.index] if self.device.type == "cuda" else None
            return nn.parallel.DistributedDataParallel(model, device_ids=ids,
                                                       find_unused_parameters=may_leave_unused(model))
        if self.strategy == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh(self.device.type, (self.world,))
            for block in model.blocks:
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
        return model

    def _shard_experts(self, model: nn.Module) -> None:
        groups = expert_groups(model)
        sizes = sorted({g.num_experts for g in groups})
        bad = [e for e in sizes if e % self.expert]
        if not groups or bad:
            why = "the model has no MoE layer" if not groups else f"it must divide num_experts = {bad[0]}"
            raise RecipeError(f"expert_parallel = {self.expert}: {why}", file=self.source,
                              path="parallel.expert_parallel")
        shard_experts(model, self.rank % self.expert, self.expert, self.expert_group)

    def reduce_gradients(self, params: list[nn.Parameter]) -> None:
        """Under expert parallelism: average the gradients of one optimizer step as DDP would.

        Each rank's loss is the mean over its share of the global batch, so the single-process gradient
        is the sum over all ranks divided by the world size: dense parameters sum over all ranks, expert
        shards over the ranks holding the same experts (their all-to-all backward already summed the
        contributions of the other ranks of their expert group).
        """
        if self.expert == 1:
            return
        self._sum_grads([p for p in params if not is_expert(p)], None)
        self._sum_grads([p for p in params if is_expert(p)], self.replica_group)

    def _sum_grads(self, params: list[nn.Parameter], group) -> None:
        """grad = Σ over `group` / world size, in one all-reduce; stays None where no rank has one."""
        if not params:
            return
        flat = torch.cat([torch.cat([p.grad.detach().flatten().float(), p.grad.new_ones(1, dtype=torch.float)])
                          if p.grad is not None else torch.zeros(p.numel() + 1, device=p.device) for p in params])
        if dist.get_world_size(group) > 1:
            dist.all_reduce(flat, group=group)
        for p, part in zip(params, flat.split([p.numel() + 1 for p in params])):
            if part[-1] > 0:  # some rank had a gradient (the flag summed over the group)
                p.grad = (part[:-1] / self.world).view_as(p).to(p.dtype)

    def grad_norm(self, params: list[nn.Parameter]) -> float:
        """The 2-norm of the whole model's gradient in `params` (all shards, all experts)."""
        def squares(ps: list[nn.Parameter]) -> float:
            return sum(float(full(p.grad).float().pow(2).sum()) for p in ps if p.grad is not None)

        if self.expert == 1:
            return math.sqrt(squares(params))
        total = squares([p for p in params if not is_expert(p)])  # the same on every rank
        part = torch.tensor([squares([p for p in params if is_expert(p)])], dtype=torch.float64,
                            device=self.device)  # this rank's experts: summed over the expert group
        dist.all_reduce(part, group=self.expert_group)
        return math.sqrt(total + float(part))

    def clip_grad_norm(self, params: list[nn.Parameter], max_norm: float) -> float:
        """Scale the gradients to norm <= max_norm; return the norm before (over the whole model)."""
        if self.expert == 1:
            return float(full(nn.utils.clip_grad_norm_(params, max_norm)))
        norm = self.grad_norm(params)
        nn.utils.clip_grads_with_norm_(params, max_norm, torch.tensor(norm))
        return norm

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global micro-batch."""
        n = x.shape[0] // self.world
        return x[self.rank * n:(self.rank + 1) * n]

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Average per-rank scalars (each rank's mean over an equal share of the batch) over all ranks."""
        if self.world == 1 or not values:
            return values
        t = torch.tensor(list(values.values()), dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return dict(zip(values, (t / self.world).tolist()))

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """The whole model's tensors (gathered from the shards under FSDP or expert parallelism);
        None = model.state_dict(). Every rank takes part."""
        if not self.sharded:
            return None
        if self.expert > 1:
            experts = {n for n, p in model.named_parameters() if is_expert(p)}
            return {n: gather_experts(t, self.expert, self.expert_group) if n in experts else t
                    for n, t in model.state_dict().items()}
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def optimizer_state(self, opt: torch.optim.Optimizer) -> dict:
        """opt.state_dict() as one process has it: FSDP2's sharded moments gathered (every rank, in one order)."""
        sd = opt.state_dict()
        params = [p for g in opt.param_groups for p in g["params"]]

        def whole(v, p: torch.Tensor):
            if self.expert > 1 and is_expert(p) and isinstance(v, torch.Tensor) and v.shape == p.shape:
                return gather_experts(v, self.expert, self.expert_group)
            return full(v)
        return {"state": {i: {k: whole(v, params[i]) for k, v in sorted(sd["state"][i].items())}
                          for i in sorted(sd["state"])},
                "param_groups": sd["param_groups"]}

    def optimizer_loader(self, opt: torch.optim.Optimizer) -> Callable[[dict], None]:
        """A function loading a single-process opt.state_dict() into `opt` (moments sharded like their weights)."""
        from torch.distributed.tensor import DTensor, distribute_tensor

        params = [p for g in opt.param_groups for p in g["params"]]

        def load(sd: dict) -> None:
            for i, st in sorted(sd["state"].items()):  # every rank read the whole state: it keeps its slice
                p = params[i]
                if self.expert > 1 and is_expert(p):  # this rank's experts of each moment
                    lo = (self.rank % self.expert) * p.shape[0]
                    whole = (p.shape[0] * self.expert, *p.shape[1:])
                    sd["state"][i] = {k: v[lo:lo + p.shape[0]] if isinstance(v, torch.Tensor) and v.shape == whole
                                      else v for k, v in st.items()}
                elif isinstance(p, DTensor):
                    sd["state"][i] = {k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements,
                                                           src_data_rank=None)
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


def may_leave_unused(model: nn.Module) -> bool:
    """Whether a training step may leave a parameter without a gradient, so that DDP must look for such
    parameters after each backward (else it waits for their all-reduce forever): a model with MoE layers
    may (routing decides what runs), any other when one forward and backward pass leaves one out. Asked
    for nothing more, DDP warns on every rank that it found none: the dense run's warning twice."""
    if expert_groups(model):
        return True
    device = next(model.parameters()).device
    idx = torch.randint(0, model.config.vocab_size, (1, 9), device=device, generator=torch.Generator(device)
                        .manual_seed(0))
    model(idx[:, :-1], idx[:, 1:]).total_loss.backward()
    unused = any(p.requires_grad and p.grad is None for p in model.parameters())
    model.zero_grad(set_to_none=True)
    return unused


def full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP2 gradients, norms) as a plain tensor; a plain tensor as is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def resolve_device(setting: str, local_rank: int, source: str | None = None) -> torch.device:
    """train.device as a torch.device: auto = CUDA if available, else the CPU; rank `local_rank` of a node
    takes GPU `local_rank`."""
    if setting == "cpu" or (setting == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RecipeError("'cuda', but torch sees no CUDA device here; use 'cpu' or 'auto'", file=source,
                          path="train.device")
    gpus = torch.cuda.device_count()
    if local_rank >= gpus:
        raise RecipeError(f"LOCAL_RANK={local_rank} but this node has {gpus} CUDA device(s): launch at most {gpus} "
                          "processes per node, or use 'cpu'", file=source, path="train.device")
    return torch.device("cuda", local_rank)


def resolve_backend(setting: str, device: torch.device, source: str | None = None) -> str:
    """parallel.backend for a model on `device`: auto = nccl on CUDA, gloo on the CPU."""
    if setting == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if setting == "nccl" and device.type != "cuda":
        raise RecipeError(f"nccl needs CUDA tensors, and train.device is {device.type} here; use backend 'gloo' "
                          "or 'auto'", file=source, path="parallel.backend")
    return setting


def check_launch(recipe, world: int, local_rank: int = 0) -> tuple[torch.device, str]:
    """Refuse a recipe that cannot train on `world` ranks (a RecipeError naming the key); return local rank
    `local_rank`'s device and the backend. Every rank checks at setup, `zoo train --nproc-per-node` before
    it starts one."""
    cfg, src = recipe.parallel, recipe.source or None
    device = resolve_device(recipe.train.device, local_rank, src)
    if world == 1:
        return device, ""
    if cfg.strategy == "none":
        raise RecipeError(f"launched on {world} processes but parallel.strategy is 'none'; "
                          "set it to 'ddp' or 'fsdp'", file=src, path="parallel.strategy")
    per_step = recipe.train.grad_accum * world
    if recipe.train.batch_size % per_step:
        raise RecipeError(f"train.batch_size={recipe.train.batch_size} (the global batch) must be divisible by "
                          f"grad_accum x world size = {recipe.train.grad_accum} x {world}",
                          file=src, path="train.batch_size")
    n = cfg.expert_parallel
    if n > 1 and cfg.strategy != "ddp":
        raise RecipeError(f"expert_parallel = {n} needs parallel.strategy = 'ddp' (the other parameters stay "
                          f"replicated), not {cfg.strategy!r}", file=src, path="parallel.expert_parallel")
    if world % n:
        raise RecipeError(f"expert_parallel = {n} must divide the world size {world}", file=src,
                          path="parallel.expert_parallel")
    return device, resolve_backend(cfg.backend, device, src)


def setup(recipe) -> Parallel:
    """Join the process group the environment describes (torchrun, `zoo train --nproc-per-node`); a plain
    process is rank 0 of 1.

    Either way, resolve train.device (before anything is written)."""
    cfg, src = recipe.parallel, recipe.source or None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device, backend = check_launch(recipe, world, int(os.environ.get("LOCAL_RANK", "0")) if world > 1 else 0)
    if world == 1:
        return Parallel(device=device)
    n = cfg.expert_parallel
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend)
    rank = dist.get_rank()
    expert_group = replica_group = None
    if n > 1:  # every rank creates every group, in one order: ranks g·n … g·n+n−1 split the experts,
        for g in range(world // n):  # ranks i, i+n, i+2n … hold the same ones
            group = dist.new_group(list(range(g * n, (g + 1) * n)))
            expert_group = group if rank // n == g else expert_group
        for i in range(n):
            group = dist.new_group(list(range(i, world, n)))
            replica_group = group if rank % n == i else replica_group
    return Parallel(cfg.strategy, rank, world, n, expert_group, replica_group, src, device)
