"""Projection-input sparsity: `none`, Q-Sparse `topk` and Block Q-Sparse `block_topk` (N:M).

Q-Sparse (arXiv 2407.10969): per token, keep the K entries of largest |x| and zero the rest,
Y = (X ⊙ M)·Wᵀ with M = TopK(|X|); backward is straight-through (the gradient of the masked
input reaches every input entry) unless `ste = false`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from zoo.contracts import Sparsity
from zoo.schema import Invalid, param

FEW_ROWS = 8  # up to this many rows (decode) torch.kthvalue beats NumPy's per-call overhead on CPU


def kth_largest(a: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest value of each row of `a` (last dim), shape [..., 1]; 1 <= k <= width."""
    width = a.shape[-1]
    # compiled (a decode step): torch's op, which the compiler traces; NumPy would break the graph
    if a.device.type != "cpu" or a.numel() <= FEW_ROWS * width or torch.compiler.is_compiling():
        return a.kthvalue(width - k + 1, dim=-1, keepdim=True).values
    # NumPy's introselect tracks no indices: ~2-10x faster than torch.kthvalue on CPU for many rows
    kth = np.partition(_numpy(a.reshape(-1, width)), width - k, axis=-1)[:, width - k]
    return torch.from_numpy(kth).to(a.dtype).reshape(*a.shape[:-1], 1)


def topk_mask(a: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of exactly `k` largest entries of `a` along the last dim; ties go to the lower index.

    A threshold (the k-th largest value) and one comparison give the mask; only when some row
    holds ties at its threshold are those tied entries trimmed, left to right.
    """
    width = a.shape[-1]
    if k >= width:
        return torch.ones_like(a, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(a, dtype=torch.bool)
    kth = kth_largest(a, k)
    mask = a >= kth
    # every row holds >= k: no row holds more (compiled: no data-dependent branch, the trim below keeps it all)
    if not torch.compiler.is_compiling() and int(mask.sum()) == k * (a.numel() // width):
        return mask
    above = a > kth
    tied = mask & ~above
    need = k - above.sum(-1, keepdim=True)
    return above | (tied & (tied.cumsum(-1) <= need))


def topk_indices(a: torch.Tensor, k: int) -> torch.Tensor:
    """Column indices [N, k] of the entries `topk_mask(a, k)` keeps in rows a [N, width], ascending.

    On CPU, when no row holds ties at its threshold (the common case), the indices come from one
    comparison against the k-th largest value and NumPy's `nonzero`: a few microseconds for a
    decode row, where the torch mask → `nonzero` chain costs several op dispatches. Rows with ties
    take the mask path, so the result is always exactly the mask's.
    """
    n, width = a.shape
    if a.device.type == "cpu" and 0 < k < width and not torch.compiler.is_compiling():
        kth = kth_largest(a, k)
        flat = np.flatnonzero(_numpy(a) >= _numpy(kth))
        if flat.size == n * k:  # every row holds >= k at or above its threshold: no row holds more
            return torch.from_numpy(flat if n == 1 else flat % width).view(n, k)
    return mask_indices(topk_mask(a, k), k)


def mask_indices(mask: torch.Tensor, k: int) -> torch.Tensor:
    """Column indices [N, k], ascending, of a mask [N, width] that holds exactly k per row. Compiled: a sort
    of the kept positions (static shapes, so a decode step stays one graph) instead of `nonzero`."""
    if not torch.compiler.is_compiling():
        return mask.nonzero()[:, -1].view(mask.shape[0], k)
    width = mask.shape[-1]
    pos = torch.arange(width, device=mask.device)
    return torch.where(mask, pos, width).sort(-1).values[:, :k]


def _numpy(t: torch.Tensor) -> np.ndarray:
    """A NumPy view of a CPU tensor (bf16/fp16 widened to float32: exact, order kept)."""
    return (t if t.dtype in (torch.float32, torch.float64) else t.float()).numpy()


class _MaskInput(torch.autograd.Function):
    """x ⊙ mask forward; backward passes the gradient to all entries (STE) or to the kept ones only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, mask: torch.Tensor, ste: bool) -> torch.Tensor:
        ctx.ste = ste
        if not ste:
            ctx.save_for_backward(mask)
        return x * mask

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if ctx.ste:
            return grad, None, None
        (mask,) = ctx.saved_tensors
        return grad * mask, None, None


def mask_input(x: torch.Tensor, mask: torch.Tensor, ste: bool = True, rescale: bool = False) -> torch.Tensor:
    """x ⊙ mask, straight-through when `ste`; `rescale` multiplies each token by ‖x‖₂ / ‖x ⊙ mask‖₂."""
    y = _MaskInput.apply(x, mask, ste)
    return y * norm_ratio(x, y) if rescale else y


@torch.no_grad()
def norm_ratio(x: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """‖x‖₂ / ‖kept‖₂ per row ([..., 1], in x's dtype; 1 where nothing was kept): the rescale factor."""
    wide = torch.promote_types(x.dtype, torch.float32)
    full = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=wide)
    part = torch.linalg.vector_norm(kept, dim=-1, keepdim=True, dtype=wide)
    return torch.where(part > 0, full / part, 1.0).to(x.dtype)


@dataclass(frozen=True)
class MaskOptions:
    """Options shared by the top-K sparsifiers."""

    ste: bool = param(True, "straight-through backward: the gradient reaches every input, not only kept ones")
    rescale: bool = param(False, "multiply each kept token by ‖x‖₂/‖x⊙M‖₂ (scale treated as a constant in "
                                 "backward); the official code does not rescale")


@dataclass(frozen=True)
class TopKConfig(MaskOptions):
    """Q-Sparse: keep the K = int(keep·width) largest |x| of each token, zero the rest"""

    keep: float = param(0.5, "fraction of the input width kept per token (K = int(keep·width))", gt=0, le=1)


@dataclass(frozen=True)
class BlockTopKConfig(MaskOptions):
    """Block Q-Sparse (N:M): keep the N largest |x| in each contiguous block of M inputs"""

    n: int = param(16, "entries kept per block", ge=0)
    m: int = param(32, "block length (must divide the projection's input width)", ge=1)

    def check(self) -> None:
        if self.n > self.m:
            raise Invalid("n", f"n={self.n} must be <= m={self.m} (keep N of each block of M)")


class TopK(Sparsity):
    """y = x ⊙ TopK(|x|) per token; `keep_fraction` = K / width."""

    def __init__(self, width: int, k: int, ste: bool = True, rescale: bool = False):
        super().__init__()
        self.width, self.k, self.ste, self.rescale = width, k, ste, rescale

    @property
    def keep_fraction(self) -> float:
        return self.k / self.width

    @property
    def magnitude_topk(self) -> bool:
        """True when the kept entries are exactly the k largest |x| of the row, ties to the lower index,
        unscaled: a fused inference kernel may then select them itself (zoo.kernels.cpu.topk_gemv)."""
        return not self.rescale

    def kept_count(self, width: int) -> int | None:
        return self.k if 0 < self.k < width else None

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        return topk_mask(x.detach().abs(), self.k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mask_input(x, self.mask(x), self.ste, self.rescale)

    def kept_indices(self, x: torch.Tensor) -> torch.Tensor:
        """Ascending indices [N, k] of the entries `forward` keeps in rows x [N, width] (x detached)."""
        return topk_indices(x.abs(), self.k)

    def entries(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept entries of rows x [N, width] as (values, indices) [N, k], indices ascending:
        what `forward` keeps (same mask, same rescale), for sparse-input inference kernels (no autograd)."""
        x = x.detach()
        idx = self.kept_indices(x)
        values = x.gather(-1, idx)
        return (values * norm_ratio(x, values) if self.rescale else values), idx

    def extra_repr(self) -> str:
        return f"k={self.k}/{self.width}, ste={self.ste}, rescale={self.rescale}"


class BlockTopK(TopK):
    """y = x ⊙ M where M keeps the top `k` of |x| inside each block of `m` consecutive entries."""

    magnitude_topk = False  # the top N of every block of M, not of the row

    def __init__(self, width: int, n: int, m: int, ste: bool = True, rescale: bool = False):
        super().__init__(width, width // m * n, ste, rescale)
        self.n, self.m = n, m

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        blocks = x.detach().abs().unflatten(-1, (self.width // self.m, self.m))
        return topk_mask(blocks, self.n).flatten(-2)

    def kept_indices(self, x: torch.Tensor) -> torch.Tensor:
        return mask_indices(self.mask(x), self.k)  # the mask keeps exactly k per row

    def extra_repr(self) -> str:
        return f"{self.n}:{self.m} of {self.width}, ste={self.ste}, rescale={self.rescale}"


def build_topk(cfg: TopKConfig, ctx, width: int) -> TopK:
    return TopK(width, int(cfg.keep * width), cfg.ste, cfg.rescale)


def build_block_topk(cfg: BlockTopKConfig, ctx, width: int) -> BlockTopK:
    if width % cfg.m:
        raise Invalid("m", f"block length m={cfg.m} does not divide the projection input width {width}")
    return BlockTopK(width, cfg.n, cfg.m, cfg.ste, cfg.rescale)


@dataclass(frozen=True)
class NoSparsityConfig:
    """the projection sees its whole input"""


class NoSparsity(nn.Identity, Sparsity):
    """y = x: every entry kept (so a kernel that selects the kept entries itself may take the raw row)."""

    magnitude_topk = True


def kernel_selects(sparsify: Sparsity | None) -> bool:
    """Whether a fused kernel may take the raw row and select the kept entries itself: no sparsity, or a
    block whose kept entries are the row's `kept_count` largest |x| (ties to the lower index, unscaled)."""
    return sparsify is None or sparsify.magnitude_topk


def register(registry) -> None:
    registry.register("sparsity", "none", NoSparsityConfig, lambda cfg, ctx, width: NoSparsity())
    registry.register("sparsity", "topk", TopKConfig, build_topk)
    registry.register("sparsity", "block_topk", BlockTopKConfig, build_block_topk)
