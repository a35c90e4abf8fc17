"""A projection: y = W·sparsify(x). Weights and input sparsity are chosen per role by the recipe.

`ExpertProjection` is the same thing for the E experts of a MoE layer: the weights block is
built once by the projection factory and its parameters are stacked along a new leading
expert dimension ([E, out, in] for a weight matrix), so the experts run as one grouped matmul.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from zoo.contracts import Preparable, Sparsity, Weights
from zoo.kernels.moe_permute import GatheredRows, materialize

if TYPE_CHECKING:
    from zoo.blocks.moe import ExpertGroups


class Projection(nn.Module, Preparable):
    """`sparsify` (a sparsity block) then `linear` (a weights block), for one role.

    `keep` is the expected fraction of input entries that reach the matmul, so the
    projection reads that fraction of its weight columns per token (activated parameters):
    the sparsity block's `keep_fraction`, capped by `upstream_keep` (set by a block whose own
    output is sparse by construction, e.g. a GLU with `act_sparsity`).

    A weights block that must transform its input before the point where the mask belongs
    (BitNet's RMSNorm before activation quantization) sets `sparsify_inside = True` and is
    called as `linear(x, sparsify)`; it applies `sparsify` to the real-valued input it quantizes.

    What the role declares travels with it: `layer` (None outside the blocks), `base_role` (the
    root of the role's fallback chain, e.g. expert_down -> down) and `residual` (whether the
    output is added to the residual stream: init scales such weights by 1/sqrt(2·n_layers)) and
    `has_bias`, as asked of the projection factory.
    """

    num_experts = 1  # ExpertProjection: E stacked experts

    def __init__(self, role: str, sparsify: Sparsity, linear: Weights, in_features: int, out_features: int,
                 layer: int | None = None, base_role: str | None = None, residual: bool = False,
                 bias: bool = False):
        super().__init__()
        self.role, self.in_features, self.out_features = role, in_features, out_features
        self.sparsify, self.linear = sparsify, linear
        self.layer, self.base_role, self.residual, self.has_bias = layer, base_role or role, residual, bias
        self.upstream_keep = 1.0

    @property
    def keep(self) -> float:
        return min(float(self.sparsify.keep_fraction), self.upstream_keep)

    @property
    def weight_count(self) -> int:
        """Number of weights (matrix entries, no bias) this projection holds."""
        return self.in_features * self.out_features

    @property
    def bias_count(self) -> int:
        """Number of bias entries this projection holds."""
        return self.out_features if self.has_bias else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.linear.sparsify_inside:
            return self.linear(x, self.sparsify)
        return self.linear(self.sparsify(x))

    def split(self, x: torch.Tensor, sizes: Sequence[int]) -> tuple[torch.Tensor, ...]:
        """`forward(x).split(sizes, -1)` as one matmul per block of output rows (e.g. GLU's gate and up).

        Each part comes out contiguous (no strided elementwise work after it) and backward adds the
        parts' input gradients instead of concatenating their output gradients: faster on CPU. The
        input transform (sparsity, BitNet's norm and quantization) runs once, so the function is the
        same. Needs a weights block with `operands`; any other (e.g. an inference form, where one
        fused GEMV is best) runs its forward and splits the result.
        """
        operands = self.linear.operands
        if operands is None:
            return self(x).split(sizes, -1)
        xq, w, b = operands(x, self.sparsify) if self.linear.sparsify_inside else operands(self.sparsify(x))
        biases = [None] * len(sizes) if b is None else b.split(sizes)
        return tuple(F.linear(xq, wi, bi).to(x.dtype) for wi, bi in zip(w.split(sizes), biases))

    def freeze(self) -> None:
        """The weights block's frozen storage (BitNet: packed 2-bit), when it has one."""
        if self.linear.freezable:
            self.linear.freeze()

    def prepare_inference(self, dtype: torch.dtype, impl: str = "auto") -> None:
        """Put the weights block's inference form in its place."""
        device = next(self.parameters(), next(self.buffers(), None)).device
        self.linear = self.linear.inference_form(self.sparsify, device, dtype, impl)

    def extra_repr(self) -> str:
        return f"role={self.role}, {self.in_features}->{self.out_features}"


class ExpertProjection(Projection):
    """E projections of one role with stacked parameters, applied to expert-sorted rows.

    If the weights block has `operands(x, [sparsify,] expert=None) -> (x', w, b)` (called like its
    forward; y = x'·wᵀ + b, written to accept a leading expert dim on its parameters), the
    experts run as one `backend.grouped_mm`; otherwise (or with `grouped = False`, the reference
    path) each expert's slice runs through the weights block with that expert's parameters
    (`torch.func.functional_call`). Input sparsity is per token, so it runs once over all rows.

    The MoE input arrives as `GatheredRows` (rows not gathered yet): unless the weights block
    says its input transform reads per-expert parameters (`input_per_expert`, e.g. BitNet's norm
    gain), the mask and `operands` run once on the T tokens and the backend gathers the rows
    inside its grouped matmul (`rows=`); `expert` is then None. Otherwise the rows are gathered
    first and `expert` gives each row's expert.
    """

    def __init__(self, role: str, sparsify: Sparsity, linear: Weights, in_features: int, out_features: int,
                 groups: ExpertGroups, **declared):
        super().__init__(role, sparsify, linear, in_features, out_features, **declared)
        self.groups = groups
        self.num_experts = groups.num_experts
        self.stacked_buffers: set[str] = set()  # buffers with a leading expert dim (after `freeze`)
        self.grouped = True  # False: one expert at a time (the reference path tests and benchmarks compare with)
        for name, p in list(linear.named_parameters()):
            owner, _, leaf = name.rpartition(".")
            stacked = nn.Parameter(p.detach().unsqueeze(0).repeat(self.num_experts, *([1] * p.dim())).contiguous(),
                                   requires_grad=p.requires_grad)
            stacked.expert_dims = 1  # leading dims that index experts (init treats [E, n] like [n])
            setattr(linear.get_submodule(owner), leaf, stacked)

    @property
    def weight_count(self) -> int:
        return self.num_experts * self.in_features * self.out_features

    @property
    def bias_count(self) -> int:
        return self.num_experts * super().bias_count

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.split(x, (self.out_features,))[0]

    def split(self, x: torch.Tensor, sizes: Sequence[int]) -> tuple[torch.Tensor, ...]:
        """`forward(x).split(sizes, -1)`; grouped, the backend may compute the parts as separate contiguous
        tensors (`grouped_mm_split`: on CPU a GLU's gate and up are then neither strided nor concatenated in
        backward), the experts' matmuls still one grouped call per part."""
        g = self.groups
        if g.row_expert is None:
            raise RuntimeError(f"expert projection {self.role} called outside ExpertGroups.sorted_rows / routed_rows")
        inside = self.linear.sparsify_inside  # e.g. BitNet: mask after its own input norm
        operands = self.linear.operands
        if g.offsets is None:  # routed rows (MoE.pair_dispatch): each row times its own expert's weights
            return routed_mm(self, x, g.row_expert).split(sizes, -1)
        if operands is None or not self.grouped:
            x = materialize(x)
            y = self._per_expert(x, self.sparsify) if inside else self._per_expert(self.sparsify(x))
            return y.split(sizes, -1)
        lazy = x if isinstance(x, GatheredRows) and not self.linear.input_per_expert else None
        x, expert = (lazy.tokens, None) if lazy is not None else (materialize(x), g.row_expert)
        xq, w, b = operands(x, self.sparsify, expert=expert) if inside else operands(self.sparsify(x), expert=expert)
        rows = None
        if lazy is not None:  # per-token steps ran on the T tokens; now their rows, gathered in the matmul or here
            if g.backend.fuses_gather(xq):
                rows = lazy.token_of_row
            else:
                xq = lazy.gather_like(xq)
        ys = g.backend.grouped_mm_split(xq, w, g.offsets, sizes, rows)
        if b is not None:
            ys = [y + c for y, c in zip(ys, b.index_select(0, g.row_expert).split(sizes, -1))]
        return tuple(y.to(x.dtype) for y in ys)

    @torch.no_grad()
    def freeze(self) -> None:
        """Freeze each expert's weights block (BitNet: packed 2-bit storage + β) and stack the results.

        The weights block's own `freeze` runs on a single-expert copy holding expert e's slice;
        every tensor it leaves (parameters and buffers, e.g. `packed` [E, in, ceil(out/4)] and
        `scale` [E, 1]) is stacked along the expert dimension again.
        """
        if not self.linear.freezable or self.stacked_buffers:
            return
        stacked = dict(self.linear.named_parameters())
        single = copy.deepcopy(self.linear, memo={id(p): p[0].clone() for p in stacked.values()})
        experts = []
        for e in range(self.num_experts):
            one = copy.deepcopy(single)
            for name, p in stacked.items():
                _set(one, name, nn.Parameter(p[e].clone(), requires_grad=p.requires_grad))
            one.freeze()
            experts.append(one)
        for name in stacked:  # tensors the freeze dropped (BitNet's latent weight)
            owner, _, leaf = name.rpartition(".")
            delattr(self.linear.get_submodule(owner), leaf)
        for name, p in experts[0].named_parameters():
            param = nn.Parameter(torch.stack([dict(m.named_parameters())[name] for m in experts]),
                                 requires_grad=p.requires_grad)
            param.expert_dims = 1
            _set(self.linear, name, param)
        for name, _ in experts[0].named_buffers():
            owner, _, leaf = name.rpartition(".")
            self.linear.get_submodule(owner).register_buffer(
                leaf, torch.stack([dict(m.named_buffers())[name] for m in experts]))
            self.stacked_buffers.add(name)

    def prepare_inference(self, dtype: torch.dtype, impl: str = "auto") -> None:
        """Stacked experts keep running through their kernel backend; the weights block gets ready for it."""
        self.linear.prepare_stacked(dtype)

    def _per_expert(self, x: torch.Tensor, *extra: nn.Module) -> torch.Tensor:
        """Each expert's rows through the weights block with that expert's slice of the parameters."""
        buffers = dict(self.linear.named_buffers())
        params = {**dict(self.linear.named_parameters()), **{n: buffers[n] for n in self.stacked_buffers}}
        ends = self.groups.offsets.tolist()
        starts = [0, *ends[:-1]]
        return torch.cat([functional_call(self.linear, {n: p[e] for n, p in params.items()}, (x[s:t], *extra))
                          for e, (s, t) in enumerate(zip(starts, ends))])

    def extra_repr(self) -> str:
        return f"role={self.role}, {self.num_experts} × {self.in_features}->{self.out_features}"


def routed_mm(proj: ExpertProjection, x: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
    """y[r] = proj's expert expert[r] applied to row x[r], reading only those experts' weights.

    Through `operands` (x', W [E, out, in], b): compiled, y[r] = Σ_i x'[r, i] · W[expert[r], :, i] is one
    generated reduction that indexes W in place (static shapes: the decode step's graph holds it);
    eagerly, one `F.linear` per row on its expert's slice. A weights block without `operands` runs with
    each row's expert's parameters (`torch.func.functional_call`, eager only)."""
    linear, inside = proj.linear, proj.linear.sparsify_inside
    if linear.operands is None:
        buffers = dict(linear.named_buffers())
        params = {**dict(linear.named_parameters()), **{n: buffers[n] for n in proj.stacked_buffers}}
        return torch.cat([functional_call(linear, {n: p[e] for n, p in params.items()},
                                          (x[r:r + 1], proj.sparsify) if inside else (proj.sparsify(x[r:r + 1]),))
                          for r, e in enumerate(expert.tolist())])
    xq, w, b = linear.operands(x, proj.sparsify, expert=expert) if inside else linear.operands(proj.sparsify(x),
                                                                                                expert=expert)
    if torch.compiler.is_compiling():
        y = (xq.unsqueeze(1).to(w.dtype) * w[expert]).sum(-1)
    else:
        y = torch.cat([F.linear(xq[r:r + 1], w[e]) for r, e in enumerate(expert.tolist())])
    if b is not None:
        y = y + b.index_select(0, expert)
    return y.to(x.dtype)


def _set(module: nn.Module, name: str, value: nn.Parameter) -> None:
    """Set the parameter at dotted `name` inside `module`."""
    owner, _, leaf = name.rpartition(".")
    setattr(module.get_submodule(owner), leaf, value)
