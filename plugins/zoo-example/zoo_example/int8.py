"""Int8 projection weights, registered as the `weights` kind `int8`: a weights kind with its own fast
inference path, written against zoo.contracts only.

    y = (Q(x)·Q(W)ᵀ) + b     Q(W)[o] = round(W[o] / s_o)·s_o,  s_o = max|W[o]| / 127  (one scale per output)
                             Q(x)[t] = round(x[t] / a_t)·a_t,  a_t = max|x[t]| / 127  (one per token)

Training keeps a latent float weight and computes with the quantized values (straight-through).
`freeze()` keeps only the int8 weight and its scales (what a checkpoint then holds); the inference
form, `Int8GEMV`, multiplies the int8 rows by the int8 weight with int32 accumulation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from zoo.contracts import InferenceForm, Sparsity, Weights


@dataclass(frozen=True)
class Int8Config:
    """per-output-channel int8 weights × per-token int8 activations, int32 sums (int8 decode GEMV once frozen)"""


def absmax_int8(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, s) with t ≈ q·s: q int8 = round(t / s), s float32 = max|t| / 127 over the last dim ([..., 1])."""
    t = t.detach().float()
    s = t.abs().amax(-1, keepdim=True).clamp(min=1e-8) / 127
    return (t / s).round().clamp(-127, 127).to(torch.int8), s


def int8_matmul(xq: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """int32 [N, out] = xq [N, in] · qᵀ (q [out, in]), both int8, summed exactly: `torch._int_mm` on CPU,
    float64 sums (exact at these sizes) elsewhere."""
    if xq.device.type == "cpu":
        return torch._int_mm(xq, q.t())
    return (xq.double() @ q.double().t()).to(torch.int32)


class Int8Linear(Weights):
    """Training: latent `weight`, quantized in the forward; frozen: `qweight` int8 [out, in] + `scale` [out, 1]."""

    freezable = True

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    @property
    def frozen(self) -> bool:
        return "qweight" in self._buffers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq, a = absmax_int8(x)
        x = x + ((xq * a).to(x.dtype) - x).detach()  # straight-through
        if self.frozen:
            w = (self.qweight * self.scale.float()).to(x.dtype)
        else:
            q, s = absmax_int8(self.weight)
            w = self.weight + ((q * s).to(self.weight.dtype) - self.weight).detach()
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def freeze(self) -> None:
        """Keep only the int8 weight and its scales (a second call finds it done)."""
        if self.frozen:
            return
        q, s = absmax_int8(self.weight)
        del self.weight
        self.register_buffer("qweight", q)
        self.register_buffer("scale", s)

    def inference_form(self, sparsify: Sparsity, device: torch.device, dtype: torch.dtype,
                       impl: str = "auto") -> Weights:
        return Int8GEMV(self.qweight, self.scale, self.bias) if self.frozen else self

    def inference_nbytes(self) -> int:
        """int8 weights, a float32 scale per output, the bias."""
        bias = 0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        weights = (self.qweight if self.frozen else self.weight).numel()
        return weights + 4 * (weights // self.in_features) + bias


class Int8GEMV(InferenceForm):
    """y = (Q(sparsify(x)) · qweightᵀ) · a · scale + b: int8 rows × int8 weight, int32 sums. Keeps the
    frozen block's tensors under their names, so the state dict does not change."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.bias = bias

    def forward(self, x: torch.Tensor, sparsify: Sparsity | None = None) -> torch.Tensor:
        if sparsify is not None:
            x = sparsify(x)
        xq, a = absmax_int8(x.reshape(-1, self.in_features))
        y = int8_matmul(xq, self.qweight).float() * a * self.scale.float().reshape(-1)
        y = y if self.bias is None else y + self.bias.float()
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{self.in_features}->{self.out_features}, int8 GEMV"


def build_int8(cfg: Int8Config, ctx, in_features: int, out_features: int, bias: bool) -> Int8Linear:
    """The `weights` slot's factory signature: (config, build context, in, out, bias)."""
    return Int8Linear(in_features, out_features, bias)
