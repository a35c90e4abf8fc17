"""Full-precision projection weights, and their inference forms (`zoo.kernels.prepare_inference`):

- with a sparsity block keeping exactly K inputs per token (`kept_count`): `TopKLinear`, the weight
  held once as Wt [in, out] and multiplied by the sparse-input kernel when rows · keep < 1
  (decode), densely otherwise;
- other fp32 weights on CPU (and an untied LM head): `TransposedLinear`, the same Wt layout; one
  row goes through zoo's compiled GEMV (zoo/kernels/cpu.py: both cores, ~1.5× faster than MKL's
  one-thread GEMV; it reads only the weight rows of the row's nonzero entries), more rows, or no
  compiled kernels, through `x @ Wt` (which reads Wt faster than `F.linear` reads W). With a
  sparsity block that declares skippable zeros (`zeros_inputs`, e.g. `threshold`) it counts that
  share of Wt as read, and a few rows whose expected nonzero entries add up to under one row take
  the compiled GEMV too;
- anything else (bf16 or CUDA without top-K): itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from zoo.blocks.sparsity import kernel_selects
from zoo.contracts import InferenceForm, Sparsity, Weights
from zoo.kernels import cpu
from zoo.kernels.dispatch import choose
from zoo.kernels.topk_matmul import gather_pays, top_entries, topk_matmul
from zoo.schema import param


@dataclass(frozen=True)
class FullPrecisionConfig:
    """a dense floating-point weight matrix: y = x·Wᵀ (+ b)"""

    dtype: Literal["model", "float32", "bfloat16", "float16"] = param(
        "model", "storage and compute dtype of this projection ('model' = model.dtype)")


class Linear(nn.Linear, Weights):
    """nn.Linear that computes in its own dtype when it differs from the input's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype:
            return F.linear(x, self.weight, self.bias)
        b = None if self.bias is None else self.bias.to(self.weight.dtype)
        return F.linear(x.to(self.weight.dtype), self.weight, b).to(x.dtype)

    def operands(self, x: torch.Tensor, expert: torch.Tensor | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(x', W, b) with y = x'·Wᵀ + b: lets MoE experts with stacked [E, out, in] weights run grouped.
        x' depends on the token only, so `expert` (each row's expert) is not needed."""
        return x.to(self.weight.dtype), self.weight, self.bias

    def inference_form(self, sparsify: Sparsity, device: torch.device, dtype: torch.dtype,
                       impl: str = "auto") -> Weights:
        k = sparsify.kept_count(self.in_features)
        if k is not None:
            return TopKLinear(self.weight, self.bias, k, impl)
        if not transposed_pays(self.weight, impl):
            return self
        return TransposedLinear(self.weight, self.bias, impl, sparsify.keep_fraction if sparsify.zeros_inputs else 1.0)


class PinnedDtypeLinear(Linear):
    """A Linear whose dtype is pinned by the recipe: `model.to(dtype)` leaves it alone."""

    def _apply(self, fn, recurse=True):
        dtype = self.weight.dtype
        out = super()._apply(fn, recurse)
        for p in self.parameters(recurse=False):
            p.data = p.data.to(dtype)
        return out


def build_linear(cfg: FullPrecisionConfig, ctx, in_features: int, out_features: int, bias: bool) -> nn.Module:
    if cfg.dtype == "model":
        return Linear(in_features, out_features, bias=bias)
    return PinnedDtypeLinear(in_features, out_features, bias=bias, dtype=getattr(torch, cfg.dtype))


def transposed_pays(weight: torch.Tensor, impl: str = "auto") -> bool:
    """Whether a dense projection decodes faster from Wt: fp32 on CPU (`x @ Wt` vs `F.linear`, measured),
    and bf16 on CPU through zoo's compiled GEMV (it reads bf16 Wt ~1.5× faster than `F.linear` reads W,
    1 thread; without it bf16 is the other way round). CUDA's GEMV reads either layout at full speed."""
    if weight.device.type != "cpu":
        return False
    return weight.dtype == torch.float32 or (weight.dtype == torch.bfloat16 and impl != "torch" and cpu.usable(weight))


class TransposedLinear(InferenceForm):
    """y = sparsify(x)·Wᵀ (+ b) from the weight held transposed, Wt [in, out] row-major.

    On CPU one row (decode) goes through zoo's compiled GEMV when it is built (`impl` 'auto' or
    'cpu'; both cores stream Wt, skipping the rows of zero inputs), else `x @ Wt`, which reads Wt
    faster than `F.linear` reads W [out, in] (MKL's batch-1 GEMV: 10–25 % at decode shapes,
    docs/benchmarks.md). `keep` < 1: the expected nonzero share of the input, declared by a
    `zeros_inputs` sparsity block; rows · keep < 1 rows also take the compiled GEMV, and
    `bytes_per_token` counts that share of Wt. Saves and loads `weight` [out, in] like nn.Linear, so
    checkpoints do not change.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, impl: str = "auto", keep: float = 1.0):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("wt", weight.detach().t().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.impl, self.keep = impl, float(keep)
        self.compiled_gemv = choose(impl, self.wt.device, cpu_kernel=cpu.usable(self.wt)) == "cpu"

    @property
    def weight(self) -> torch.Tensor:
        return self.wt.t()

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight.contiguous()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias

    def _load_from_state_dict(self, state_dict, prefix, *args):
        if prefix + "weight" in state_dict:
            self.wt.copy_(state_dict.pop(prefix + "weight").t())
        super()._load_from_state_dict(state_dict, prefix, *args)

    def dense(self, rows: torch.Tensor) -> torch.Tensor:
        """rows [N, in] in wt's dtype → rows·Wᵀ (+ b)."""
        if self.compiled_gemv and (rows.shape[0] == 1 or gather_pays(rows.shape[0], self.keep)):
            return cpu.gather_gemv(rows, None, self.wt, self.bias).to(rows.dtype)
        y = cpu.matmul(rows, self.wt)  # a half-precision batch goes through fp32 where torch's half GEMM is slow
        return y if self.bias is None else y + self.bias

    def forward(self, x: torch.Tensor, sparsify: Sparsity | None = None) -> torch.Tensor:
        x = x if sparsify is None else sparsify(x)
        return self.dense(x.reshape(-1, self.in_features)).view(*x.shape[:-1], self.out_features)

    def bytes_per_token(self) -> int:
        """Wt (through the compiled GEMV, the expected `keep` share of its rows) and the bias."""
        rows = round(self.keep * self.in_features) if self.compiled_gemv else self.in_features
        return rows * self.out_features * self.wt.element_size() + _nbytes(self.bias)

    def extra_repr(self) -> str:
        keep = f", nonzero inputs≈{self.keep:g}" if self.keep < 1 else ""
        return f"{self.in_features}->{self.out_features}, Wt layout{keep}"


class TiedTransposedHead(nn.Module):
    """An LM head tied to the embedding, at inference: it keeps the shared `weight` (so the tie, the state
    dict and the checkpoint stay as they are) and a transposed copy Wt (not saved: the matrix's memory once
    more) that one row (decode) reads through zoo's compiled GEMV; more rows take `F.linear` on `weight`."""

    def __init__(self, head: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = head.in_features, head.out_features
        self.weight, self.bias = head.weight, head.bias
        self.register_buffer("wt", head.weight.detach().t().contiguous(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] > 1:
            y = cpu.matmul(rows, self.wt)
            return (y if self.bias is None else y + self.bias).view(*x.shape[:-1], self.out_features)
        return cpu.gather_gemv(rows, None, self.wt, self.bias).to(x.dtype).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{self.in_features}->{self.out_features}, tied, Wt copy for decode"


class TopKLinear(TransposedLinear):
    """y = sparsify(x)·Wᵀ (+ b) for a sparsity block keeping k inputs per row, from Wt [in, out].

    At decode the kept entries are selected once, straight into the (values, indices) form the
    kernel reads — or, with the compiled kernels and a `magnitude_topk` sparsity, by the kernel
    itself from the raw row (`cpu.topk_gemv`).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, k: int, impl: str = "auto"):
        super().__init__(weight, bias, impl)
        self.k = k

    def fuses(self, sparsify: Sparsity | None) -> bool:
        return self.compiled_gemv and kernel_selects(sparsify) and gather_pays(1, self.k / self.in_features)

    def forward(self, x: torch.Tensor, sparsify: Sparsity | None = None) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if gather_pays(rows.shape[0], self.k / self.in_features):
            if self.compiled_gemv and kernel_selects(sparsify):
                y = cpu.topk_gemv(rows, self.k, self.wt, self.bias)[0]  # selection and multiply in one call
            else:  # the kernels multiply in wt's dtype
                values, idx = top_entries(rows, self.k) if sparsify is None else sparsify.entries(rows)
                y = topk_matmul(values, idx, self.wt, self.bias, impl=self.impl)
        else:
            y = self.dense((rows if sparsify is None else sparsify(rows)).to(self.wt.dtype))
        return (y if y.dtype == x.dtype else y.to(x.dtype)).view(*x.shape[:-1], self.out_features)

    def bytes_per_token(self) -> int:
        """The k kept rows of Wt (decode reads only those) and the bias."""
        return self.k * self.out_features * self.wt.element_size() + _nbytes(self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, k={self.k}"


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def register(registry) -> None:
    registry.register("weights", "fp", FullPrecisionConfig, build_linear)
