"""BitNet b1.58 projection weights (arXiv 2402.17764 and its training-tips note).

Training: a latent full-precision weight W; the forward uses W̃·β with β = mean|W| + ε and
W̃ = RoundClip(W/β, -1, 1), on activations quantized per token to int8 with absmax
(s = 127 / max|x|, x̃ = clamp(round(x·s), -128, 127) / s); both straight-through (detach).
An RMSNorm sits right before activation quantization (`input_norm`). With a sparsity block
the mask is computed on the normalised real-valued input and applied before quantization:
Y = (Q(X) ⊙ M)·(W̃β)ᵀ, M = TopK(|X|) (quantized top-K; top-K keeps the max, so Q(X ⊙ M) = Q(X) ⊙ M).
`freeze()` replaces W by packed 2-bit storage plus β: `packed` uint8 [in, ceil(out/4)] in the layout
of zoo.kernels.ternary (the one the ternary matmul kernels read), `scale` float32 [1] = β.
`operands(x, sparsify, expert)` gives the quantized input and W̃β for a grouped matmul: as MoE experts, every
parameter is stacked along a leading expert dim (β per expert, each row normed with its expert's gain).

Inference form (`zoo.kernels.prepare_inference`, frozen weights): `TernaryLinear`, int8 activations times
the ternary weight (CPU: a decoded row through zoo's compiled GEMV on the packed 2-bit bytes as stored,
which reads only the kept inputs' rows when the input is top-K sparse and skips zero entries (a
`zeros_inputs` sparsity such as `threshold`, quantized zeros) in any input; batches through `torch._int_mm`
on a copy unpacked once to int8, [in, out] — or [out, in] without the compiled kernels; CUDA: the packed
Triton kernel, with the top-K gather fused in when the projection's input is top-K sparse). Stacked MoE
experts keep running through the grouped matmul, which takes float weights: they keep W̃β unpacked
(`keep_dequantized`, not saved) instead of unpacking every call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from zoo.blocks.norm import RMSNorm, rms_norm
from zoo.blocks.sparsity import kernel_selects
from zoo.contracts import InferenceForm, Sparsity, Weights
from zoo.kernels import cpu
from zoo.kernels.dispatch import choose
from zoo.kernels.ternary import TernaryWeight, pack_ternary, quantize_rows, ternary_matmul, unpack_ternary
from zoo.kernels.topk_matmul import gather_pays, top_entries
from zoo.schema import param

ACT_MAX = 127.0


def wide(t: torch.Tensor) -> torch.Tensor:
    """`t` detached, in float32 at least (quantization statistics are not taken in half precision)."""
    return t.detach().to(torch.promote_types(t.dtype, torch.float32))


def weight_scale(w: torch.Tensor, eps: float, per_row: bool = False) -> torch.Tensor:
    """β = mean|W| + ε over each [out, in] matrix ([..., 1, 1]; stacked experts get one each), or per
    output row ([..., out, 1]) when `per_row`."""
    a = wide(w).abs()
    return a.mean(-1 if per_row else (-2, -1), keepdim=True) + eps


def ternary(w: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """W̃ = RoundClip(W / β, -1, 1): values in {-1, 0, 1}."""
    return (wide(w) / beta).round().clamp(-1, 1)


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """Per-token absmax int8 fake quantization: clamp(round(x·s), -128, 127) / s, s = 127 / max|x|."""
    xw = wide(x)
    s = ACT_MAX / xw.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    return ((xw * s).round().clamp(-ACT_MAX - 1, ACT_MAX) / s).to(x.dtype)


class _StraightThrough(torch.autograd.Function):
    """Forward q, backward the identity to x: `x + (q - x).detach()` without its rounding error
    (which in bfloat16 is far from negligible)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return q.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def straight_through(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """q in the forward, identity gradient to x in the backward."""
    return _StraightThrough.apply(x, q.detach())


@dataclass(frozen=True)
class BitNetConfig:
    """BitNet b1.58: ternary absmean weights, per-token absmax int8 activations, straight-through"""

    input_norm: bool = param(True, "RMSNorm inside the projection, right before activation quantization")
    norm_eps: float = param(1e-6, "eps of that RMSNorm", ge=1e-12, le=1)
    eps: float = param(1e-5, "ε in β = mean|W| + ε", ge=1e-12, le=1)
    scale: Literal["matrix", "row"] = param(
        "matrix", "one β per matrix (BitNet b1.58), or one per output row (e.g. imported checkpoints whose "
                  "fused q/k/v or gate/up projections each had their own β)")


class BitLinear(Weights):
    """y = Q(norm(x) ⊙ M)·(W̃β)ᵀ (+ b). Training: latent `weight`; frozen: `packed` uint8 + `scale` β."""

    sparsify_inside = True  # the projection hands us its sparsity block: mask after the norm
    freezable = True

    def __init__(self, in_features: int, out_features: int, bias: bool, input_norm: bool = True,
                 norm_eps: float = 1e-6, eps: float = 1e-5, per_row: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.eps, self.per_row = in_features, out_features, eps, per_row
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.norm = RMSNorm(in_features, norm_eps) if input_norm else nn.Identity()
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    @property
    def frozen(self) -> bool:
        return "packed" in self._buffers

    @property
    def input_per_expert(self) -> bool:
        """As stacked experts, the input norm's gain differs per expert: rows must be in expert order first."""
        return isinstance(self.norm, RMSNorm)

    def quantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """W̃·β in `dtype` ([..., out, in]): from the latent weight (straight-through) or the packed storage
        (or its copy kept by `keep_dequantized`)."""
        kept = self._buffers.get("dequantized")
        if kept is not None and kept.dtype == dtype:
            return kept
        if self.frozen:
            scale = self.scale.reshape(*self.packed.shape[:-2], -1, 1)  # β [..., 1 or out, 1]
            return unpack_ternary(self.packed, self.out_features).to(dtype) * scale.to(dtype)
        beta = weight_scale(self.weight, self.eps, self.per_row)
        return straight_through(self.weight, (ternary(self.weight, beta) * beta).to(self.weight.dtype)).to(dtype)

    def operands(self, x: torch.Tensor, sparsify: nn.Module | None = None, expert: torch.Tensor | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(Q(norm(x) ⊙ M), W̃β, b) with y = x'·Wᵀ + b. Stacked experts: `expert` [N] is each row's expert
        (its norm gain; None when the rows are tokens, allowed without a norm), W̃β is [E, out, in]."""
        if expert is not None and self.input_per_expert:
            x = rms_norm(x, self.norm.weight.index_select(0, expert), self.norm.eps)  # backward: index_add_
        else:
            x = self.norm(x)
        if sparsify is not None:
            x = sparsify(x)
        x = straight_through(x, quantize_activations(x))
        b = None if self.bias is None else self.bias.to(x.dtype)
        return x, self.quantized_weight(x.dtype), b

    def forward(self, x: torch.Tensor, sparsify: nn.Module | None = None) -> torch.Tensor:
        return F.linear(*self.operands(x, sparsify))

    @torch.no_grad()
    def freeze(self) -> None:
        """Replace the latent weight by packed ternary storage (4 weights per byte) and β."""
        if self.frozen:
            return
        beta = weight_scale(self.weight, self.eps, self.per_row)
        packed = pack_ternary(ternary(self.weight, beta))
        del self.weight
        self.register_buffer("packed", packed)
        self.register_buffer("scale", beta if self.per_row else beta.reshape(1))

    @torch.no_grad()
    def keep_dequantized(self, dtype: torch.dtype) -> None:
        """Frozen: keep W̃·β unpacked in `dtype` (not saved), so inference stops unpacking it at every call."""
        if self.frozen:
            self.register_buffer("dequantized", self.quantized_weight(dtype), persistent=False)

    def inference_form(self, sparsify: Sparsity, device: torch.device, dtype: torch.dtype,
                       impl: str = "auto") -> Weights:
        """Frozen: `TernaryLinear`; with latent weights (not frozen) there is no faster form."""
        return TernaryLinear(self, device, impl, sparsify) if self.frozen else self

    def prepare_stacked(self, dtype: torch.dtype) -> None:
        """Stacked experts run through the grouped matmul, which takes float weights: a decode step would
        otherwise unpack every expert of every layer per token."""
        self.keep_dequantized(dtype)

    def inference_nbytes(self) -> int:
        """Bytes of the inference storage: packed matrix, float32 β, bias (each stacked expert's)."""
        bias = 0 if self.bias is None else self.out_features * self.bias.element_size()
        scales = self.out_features if self.per_row else 1
        experts = (self.packed if self.frozen else self.weight).shape[:-2].numel()
        return experts * (self.in_features * -(-self.out_features // 4) + 4 * scales + bias)

    def extra_repr(self) -> str:
        state = "frozen, packed 2-bit" if self.frozen else "latent weight"
        return f"{self.in_features}->{self.out_features}, bias={self.bias is not None}, {state}"


HALF_OR_FP32 = (torch.float32, torch.bfloat16, torch.float16)


class TernaryLinear(InferenceForm):
    """A frozen BitNet projection: norm, optional top-K, int8 per-token activations × ternary weight · β
    (β one per matrix or one per output row)."""

    def __init__(self, bitlinear: BitLinear, device: torch.device, impl: str = "auto",
                 sparsify: Sparsity | None = None):
        super().__init__()
        self.in_features, self.out_features = bitlinear.in_features, bitlinear.out_features
        # for `bytes_per_token`: the inputs the projection's sparsity keeps per token (None: no fixed K), and
        # the expected nonzero share of a `zeros_inputs` sparsity's output (1: not declared)
        self.kept = None if sparsify is None else sparsify.kept_count(self.in_features)
        self.keep = float(sparsify.keep_fraction) if sparsify is not None and sparsify.zeros_inputs else 1.0
        self.norm, self.bias = bitlinear.norm, bitlinear.bias
        self.register_buffer("packed", bitlinear.packed)  # the checkpoint's storage, kept as is
        self.register_buffer("scale", bitlinear.scale)
        self.impl = choose(impl, device, cpu_kernel=device.type == "cpu" and cpu.available())
        self.triton = self.impl == "triton"
        # the checkpoint storage is already the packed kernel layout; the CPU unpacks it once, here:
        # [in, out] for the compiled kernels (kept inputs read contiguous rows), [out, in] for torch's
        if self.triton:
            kernel_layout, self.layout = self.packed, "packed"
        elif self.impl == "cpu":
            kernel_layout, self.layout = unpack_ternary(self.packed, self.out_features).t().contiguous(), "rows"
        else:
            kernel_layout, self.layout = unpack_ternary(self.packed, self.out_features), "int8"
        self.register_buffer("kernel_weight", kernel_layout, persistent=False)

    def ternary_weight(self) -> TernaryWeight:
        """The kernels' layouts: on CPU `rows` for batches and the checkpoint's `packed` bytes, which a decoded
        row reads (zoo's 2-bit GEMV: a quarter of the int8 bytes)."""
        packed = {"packed": self.packed} if self.layout == "rows" else {}
        return TernaryWeight(self.in_features, self.out_features, **{self.layout: self.kernel_weight}, **packed)

    def fused(self, x: torch.Tensor, sparsify: Sparsity | None) -> bool:
        """Whether one `cpu.ternary_gemv` call does it all: the compiled kernels, one row (decode; a half-precision
        row is quantized from its fp32 values and the result rounded back), and no sparsity, a top-K the kernel
        selects itself, or zeros it skips (`zeros_inputs`)."""
        return (self.layout == "rows" and x.dtype in HALF_OR_FP32 and x.numel() == self.in_features
                and (kernel_selects(sparsify) or sparsify.zeros_inputs))

    def fuses(self, sparsify: Sparsity | None) -> bool:
        return self.layout == "rows" and kernel_selects(sparsify)

    def forward(self, x: torch.Tensor, sparsify: Sparsity | None = None) -> torch.Tensor:
        x = self.norm(x)
        if self.fused(x, sparsify):
            if not kernel_selects(sparsify):  # zeros_inputs: the block zeroes, the kernel skips the zeros
                x = sparsify(x)
            k = 0 if sparsify is None else sparsify.kept_count(self.in_features) or 0
            y = cpu.ternary_gemv(x.reshape(1, -1), k, self.packed, self.scale, self.bias,
                                 out_features=self.out_features)
            return y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        if sparsify is not None:
            x = sparsify(x)
        rows = x.reshape(-1, self.in_features)
        xq, s = quantize_rows(rows)
        k = None if sparsify is None else sparsify.kept_count(self.in_features)
        idx = None
        gathers = self.triton or (self.layout == "rows" and rows.shape[0] == 1)  # reads only the kept rows
        if gathers and k is not None and gather_pays(rows.shape[0], k / self.in_features):
            idx = top_entries(rows, k)[1]
            xq = xq.gather(-1, idx)
        wide = torch.promote_types(x.dtype, torch.float32)
        y = ternary_matmul(xq, self.ternary_weight(), 1 / s, idx, None, wide, impl=self.impl)
        y = y * self.scale.to(wide).reshape(-1)  # β: one per matrix, or one per output row
        y = (y if self.bias is None else y + self.bias.to(wide)).to(x.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def bytes_per_token(self) -> int:
        """The weight bytes a decoded row reads: the kernel layout (only the kept inputs' rows where the
        kernel gathers them: Triton, or the compiled CPU kernels, which read the packed 2-bit rows and also
        skip the rows of zero inputs: the declared `keep` share of them), β and the bias."""
        w = self.packed if self.layout == "rows" else self.kernel_weight
        if self.layout == "int8":  # [out, in]: the dense int8 GEMV reads all of it
            weight = w.numel() * w.element_size()
        else:  # [in, ...]: one row per input, only the kept inputs' rows read
            nonzero = round(self.keep * self.in_features) if self.layout == "rows" else self.in_features
            weight = (self.kept or nonzero) * w[0].numel() * w.element_size()
        bias = 0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        return weight + self.scale.numel() * self.scale.element_size() + bias

    def extra_repr(self) -> str:
        kind = {"packed": "packed 2-bit, Triton", "rows": "packed 2-bit at decode, int8 [in, out] batched, zoo cpu",
                "int8": "int8, torch._int_mm"}[self.layout]
        return f"{self.in_features}->{self.out_features}, {kind}"


def build_bitlinear(cfg: BitNetConfig, ctx, in_features: int, out_features: int, bias: bool) -> BitLinear:
    return BitLinear(in_features, out_features, bias, cfg.input_norm, cfg.norm_eps, cfg.eps, cfg.scale == "row")


def register(registry) -> None:
    registry.register("weights", "bitnet158", BitNetConfig, build_bitlinear)
