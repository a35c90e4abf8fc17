"""Mixture-of-experts FFN: a router picks top_k of num_experts FFNs per token; dropless by default.

Dispatch: sort the (token, expert) pairs by expert, run every expert on its contiguous slice
of rows (one grouped matmul per projection; the first one gathers the token rows itself, see
GatheredRows), scatter the rows back weighted by their gates.
The experts are any registered FFN kind, built once by the projection factory with roles
`expert_*` and stacked weights (see ExpertProjection), so weights and sparsity kinds apply.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from zoo import contracts
from zoo.blocks.router import Routing
from zoo.contracts import FFN, KernelBackend
from zoo.kernels.moe_permute import GatheredRows, RowLayout, combine, sort_tokens
from zoo.schema import BlockSpec, Invalid, param, slot_field


@dataclass(frozen=True)
class MoEConfig:
    """mixture of experts: each token runs through top_k of num_experts FFNs (dropless by default)"""

    num_experts: int = param(8, "routed experts", ge=1, le=1 << 14)
    top_k: int = param(2, "experts per token", ge=1, le=1 << 14)
    expert: BlockSpec = slot_field("ffn", {"kind": "glu"},
                                   "one expert: any dense FFN kind; its `hidden` is the expert width "
                                   "(small = fine-grained experts)")
    router: BlockSpec = slot_field("router", {"kind": "softmax_topk"}, "how tokens choose experts")
    shared_experts: int = param(0, "always-on experts every token passes through (0 = none)", ge=0, le=1024)
    shared_hidden: int | None = param(None, "hidden width of one shared expert (default: the expert's)",
                                      ge=1, le=1 << 20)
    shared_gate: bool = param(False, "scale the shared experts' output by sigmoid(x·w) (Qwen2-MoE)")
    aux_loss: float = param(0.01, "load-balancing loss coefficient: aux_loss · E · Σ f_i · P_i", ge=0)
    z_loss: float = param(0.001, "router z-loss coefficient: z_loss · mean logsumexp(logits)²", ge=0)
    capacity_factor: float | None = param(
        None, "drop (token, expert) pairs beyond ceil(factor · T · top_k / E) per expert (unset = dropless)",
        gt=0, le=1024)
    backend: BlockSpec = slot_field("kernel-backend", {"kind": "auto"}, "kernels for the expert matmuls")

    def check(self) -> None:
        if self.top_k > self.num_experts:
            raise Invalid("top_k", f"top_k={self.top_k} exceeds num_experts={self.num_experts}")
        if self.shared_hidden is not None and not self.shared_experts:
            raise Invalid("shared_hidden", "set shared_experts >= 1 to use shared_hidden")


class ExpertGroups:
    """Shared by the expert projections of one MoE layer (`ctx.with_experts(groups)`): its backend,
    during a forward where each expert's rows lie in the expert-sorted input (see
    `zoo.model.projection.ExpertProjection`), and `parallel`: the dispatcher when the experts are
    sharded over ranks (set by zoo.train.expert_parallel; None here)."""

    def __init__(self, num_experts: int, backend: KernelBackend):
        self.num_experts, self.backend = num_experts, backend
        self.offsets: torch.Tensor | None = None
        self.row_expert: torch.Tensor | None = None
        self.parallel: Any = None

    @contextmanager
    def sorted_rows(self, offsets: torch.Tensor, row_expert: torch.Tensor) -> Iterator[None]:
        """Inside: inputs are rows sorted by expert; expert e owns rows offsets[e-1]:offsets[e]."""
        self.offsets, self.row_expert = offsets, row_expert
        try:
            yield
        finally:
            self.offsets = self.row_expert = None

    @contextmanager
    def routed_rows(self, row_expert: torch.Tensor) -> Iterator[None]:
        """Inside: inputs are rows in any order, row r going through expert row_expert[r] (offsets None)."""
        self.row_expert = row_expert
        try:
            yield
        finally:
            self.row_expert = None


def with_hidden(ctx: contracts.BuildContext, spec: BlockSpec, hidden: int) -> BlockSpec:
    """`spec` (an FFN) with its `hidden` width replaced; a recipe error if that kind has none."""
    if not any(f.name == "hidden" for f in dataclasses.fields(spec.config)):
        raise ctx.error(spec, f"ffn kind {spec.kind!r} has no `hidden` width, so it cannot size shared experts")
    return dataclasses.replace(spec, config=dataclasses.replace(spec.config, hidden=hidden))


class MoE(FFN):
    """y = Σ_{e in top_k(x)} gate_e(x) · expert_e(x)  [+ shared(x) · sigmoid(x·w_s)]."""

    def __init__(self, cfg: MoEConfig, ctx: contracts.BuildContext, d_model: int):
        super().__init__()
        self.num_experts, self.top_k, self.capacity_factor = cfg.num_experts, cfg.top_k, cfg.capacity_factor
        self.aux_coef, self.z_coef = cfg.aux_loss, cfg.z_loss
        self.backend = ctx.build(cfg.backend)
        self.backend.check(ctx, cfg)
        self.router = ctx.build(cfg.router, d_model, cfg.num_experts, cfg.top_k)
        self.groups = ExpertGroups(cfg.num_experts, self.backend)
        self.experts = ctx.with_roles("expert_").with_experts(self.groups).build(cfg.expert, d_model)
        self.experts.token_fraction = cfg.top_k / cfg.num_experts  # accounting: activated share
        self.shared = self.shared_gate = None
        if cfg.shared_experts:
            width = cfg.shared_hidden or self.experts.hidden
            if width is None:
                raise ctx.error(None, "set shared_hidden: the expert FFN does not expose its hidden width",
                                "shared_hidden")
            spec = with_hidden(ctx, cfg.expert, cfg.shared_experts * width)
            self.shared = ctx.with_roles("shared_").build(spec, d_model)
            if cfg.shared_gate:
                self.shared_gate = nn.Linear(d_model, 1, bias=False)
        self.aux_losses: dict[str, torch.Tensor] = {}
        self.last_stats: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [T, D]
        route = self.router(x)
        by_pair = self.routes_by_pair(x)
        y = self.pair_dispatch(x, route) if by_pair else self.dispatch(x, route)
        if self.shared is not None:
            s = self.shared(x)
            y = y + (s * torch.sigmoid(self.shared_gate(x)) if self.shared_gate is not None else s)
        if not by_pair:
            self.aux_losses = self.losses(route)
        elif not torch.compiler.is_compiling():  # inference: no losses (a compiled step leaves the attribute)
            self.aux_losses = {}
        return y.reshape(shape)

    def routes_by_pair(self, x: torch.Tensor) -> bool:
        """Whether `pair_dispatch` runs: without autograd (inference), at most one (token, expert) pair per
        expert on average (decode: a few tokens), dropless, experts on this rank."""
        return (not torch.is_grad_enabled() and x.shape[0] * self.top_k <= self.num_experts
                and self.capacity_factor is None and self.groups.parallel is None)

    def pair_dispatch(self, x: torch.Tensor, route: Routing) -> torch.Tensor:
        """Each (token, choice) pair through its own expert's weights, nothing sorted: the same sum as
        `dispatch` with static shapes (T·k rows), so a compiled decode step holds it in its graph, and
        each row reads only its expert's weights (see ExpertProjection). Statistics as `dispatch`, except in a
        compiled graph (a decode step: Python state outside the graph, which nothing there reads); no losses
        (no autograd)."""
        T, k = x.shape[0], self.top_k
        expert = route.experts.flatten()
        with self.groups.routed_rows(expert):
            rows = self.experts(x.repeat_interleave(k, 0))  # row t·k + j: token t, choice j
        if not torch.compiler.is_compiling():
            counts = torch.zeros(self.num_experts, dtype=torch.long, device=x.device).index_add_(
                0, expert, torch.ones_like(expert))  # bincount with a static shape
            self.last_stats = self.statistics(route, counts, 0)
        return (rows.view(T, k, -1) * route.weights.unsqueeze(-1).to(rows.dtype)).sum(1)

    def routing_stats(self) -> Mapping[str, torch.Tensor] | None:
        """The statistics of the last forward (see `statistics`)."""
        return self.last_stats

    def capacity(self, tokens: int) -> int | None:
        """Rows each expert may take: ceil(capacity_factor · T · top_k / E), or None (dropless)."""
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * tokens * self.top_k / self.num_experts)

    @torch.compiler.disable  # data-dependent shapes and the lazy GatheredRows: eager; the rest of a model compiles
    def dispatch(self, x: torch.Tensor, route: Routing) -> torch.Tensor:
        """Sort (token, expert) pairs by expert, run the experts grouped, scatter back weighted."""
        T, k, E = x.shape[0], self.top_k, self.num_experts
        expert = route.experts.flatten()  # [T·k], pair p = (token p // k, choice p % k)
        order = torch.argsort(expert, stable=True)  # pairs grouped by expert, token order inside
        counts = torch.bincount(expert, minlength=E)
        cap = self.capacity(T)
        if cap is not None:  # keep the first `cap` pairs of each expert (in token order)
            start = torch.cumsum(counts, 0) - counts
            rank = torch.arange(order.numel(), device=x.device) - start[expert[order]]
            order = order[rank < cap]
            counts = counts.clamp(max=cap)
        sharded = self.groups.parallel  # experts split over ranks (expert parallelism), else None
        layout = RowLayout.build(expert, order, counts)
        if sharded is None:  # [R, D] rows: R = Σ counts, gathered by the first projection
            with self.groups.sorted_rows(layout.offsets, layout.row_expert):
                rows = self.experts(GatheredRows(x, layout, k))
        else:  # each row to the rank holding its expert and back
            rows = sharded.run(self.experts, sort_tokens(x, layout, k), counts)
        y = combine(rows, route.weights, layout)
        self.last_stats = self.statistics(route, counts, T * k - order.numel())
        return y

    def losses(self, route: Routing) -> dict[str, torch.Tensor]:
        """Switch load balancing E·Σ f_i·P_i (f_i over all T·k choices) and the router z-loss.

        In training under torch.distributed the token fractions f_i count the choices of every rank
        (an all-reduce of E counts), so the mean over ranks of the loss is the single-process value
        on the global batch; P_i stays this rank's mean router probability.
        """
        out = {}
        if self.aux_coef > 0:
            p = route.probs.mean(0)
            counts = torch.bincount(route.experts.flatten(), minlength=self.num_experts + 1)
            counts[-1] = route.experts.numel()  # the choices made, summed along
            if self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(counts)
            f = counts[:-1].to(p.dtype) / counts[-1]
            out["moe_lb"] = self.aux_coef * self.num_experts * (f * p).sum()
        if self.z_coef > 0:
            out["moe_z"] = self.z_coef * torch.logsumexp(route.logits, -1).square().mean()
        return out

    @torch.no_grad()
    def statistics(self, route: Routing, counts: torch.Tensor, dropped: int) -> dict[str, torch.Tensor]:
        """Per-forward measurements for eval: load per expert, its spread, router entropy, drops."""
        load = counts.float() / counts.sum().clamp(min=1)
        p = route.probs
        return {
            "tokens_per_expert": counts.detach(),
            "load": load,
            "load_cv": load.std(unbiased=False) / load.mean(),
            "router_entropy": -(p * p.clamp(min=1e-30).log()).sum(-1).mean(),
            "dropped": torch.tensor(dropped),
        }

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, top_k={self.top_k}, backend={self.backend.name}, "
                f"capacity_factor={self.capacity_factor}")


def register(registry) -> None:
    registry.register("ffn", "moe", MoEConfig, MoE)
