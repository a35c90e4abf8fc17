"""Expert parallelism: the routed experts of every MoE layer split over the ranks of an expert-parallel group.

Rank i of a group of N holds experts i·E/N … (i+1)·E/N − 1 of each layer (the leading expert dim of
every stacked expert parameter, `expert_dims`). The MoE layer sorts its rows by expert as always and
hands them to `ExpertParallel.run`, which sends each row to the rank holding its expert (all-to-all),
runs the local experts on what arrived, and sends the outputs back (all-to-all); the backward sends
the gradients the same two ways. See docs/distributed.md.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from zoo.blocks.moe import ExpertGroups
from zoo.kernels.moe_permute import GatheredRows, RowLayout, unsort_rows
from zoo.model.projection import ExpertProjection


class _Exchange(torch.autograd.Function):
    """all_to_all_single with uneven splits; the backward runs it in reverse (splits swapped)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = x.new_empty(sum(recv), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _Exchange.apply(grad, ctx.recv, ctx.send, ctx.group), None, None, None


class ExpertParallel:
    """The dispatcher an MoE layer's ExpertGroups uses when its experts are sharded over `size` ranks."""

    def __init__(self, groups: ExpertGroups, num_experts: int, index: int, size: int, group):
        self.groups, self.index, self.size, self.group = groups, index, size, group
        self.local = num_experts // size  # experts held here: index·local … (index+1)·local − 1

    def run(self, experts: Callable[[torch.Tensor], torch.Tensor], rows: torch.Tensor,
            counts: torch.Tensor) -> torch.Tensor:
        """experts(rows) for rows [R, D] sorted by (global) expert, `counts` [E] rows per expert."""
        send_counts = counts.view(self.size, self.local)  # [destination rank, its local expert]
        recv_counts = torch.empty_like(send_counts)  # [source rank, local expert]
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        send, recv = send_counts.sum(1).tolist(), recv_counts.sum(1).tolist()
        got = _Exchange.apply(rows, send, recv, self.group)  # grouped by source, then by local expert
        expert = torch.repeat_interleave(torch.arange(self.local, device=rows.device).repeat(self.size),
                                         recv_counts.flatten())
        per_expert = recv_counts.sum(0)
        layout = RowLayout.build(expert, torch.argsort(expert, stable=True), per_expert)
        with self.groups.sorted_rows(layout.offsets, layout.row_expert):
            out = experts(GatheredRows(got, layout, 1))  # the local permutation is gathered by the first projection
        return _Exchange.apply(unsort_rows(out, layout), recv, send, self.group)


def is_expert(p: torch.Tensor) -> bool:
    """Whether `p` is a stacked expert parameter (leading dim = expert)."""
    return bool(getattr(p, "expert_dims", 0))


def expert_groups(model: nn.Module) -> list[ExpertGroups]:
    """The ExpertGroups of the model's MoE layers, each once."""
    found = {id(m.groups): m.groups for m in model.modules() if isinstance(m, ExpertProjection)}
    return list(found.values())


def shard_experts(model: nn.Module, index: int, size: int, group) -> None:
    """Keep this rank's slice of every stacked expert parameter and set the dispatcher on every MoE layer."""
    for groups in expert_groups(model):
        groups.parallel = ExpertParallel(groups, groups.num_experts, index, size, group)
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if is_expert(p):
                n = p.shape[0] // size
                part = nn.Parameter(p.detach()[index * n:(index + 1) * n].clone(), requires_grad=p.requires_grad)
                part.expert_dims = p.expert_dims
                setattr(module, name, part)


def gather_experts(t: torch.Tensor, size: int, group) -> torch.Tensor:
    """The whole stacked tensor from every rank's slice (along the expert dim)."""
    parts = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts)
