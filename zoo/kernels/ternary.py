"""Ternary matmul: int8 per-token activations times {-1, 0, +1} weights (BitNet b1.58 inference).

    y[n] = row_scale[n] · Σ_i xq[n, i] · w̃[:, i]   (+ bias)

`row_scale` folds the weight scale and the activation dequantisation (γ / s_n for absmean γ and
absmax s_n). With `indices`, xq [N, K] holds only the kept entries of each row (quantized top-K)
and the sum runs over `indices[n]`: the fused gather.

Layouts (`TernaryWeight`):
- `packed` [in, ceil(out/4)] uint8, for the Triton kernel: kept inputs read contiguous rows. Byte
  (i, j) holds the weights of outputs j, j+R, j+2R, j+3R (R = ceil(out/4)) at bits 0-1, 2-3,
  4-5, 6-7, each stored as w̃ + 1 ∈ {0, 1, 2}; padding outputs hold 1 (weight 0).
- `int8` [out, in] int8, for the torch CPU path: unpacked once at load, multiplied with `torch._int_mm`.
- `rows` [in, out] int8, for the compiled CPU path (zoo/kernels/cpu.py): more rows go to `torch._int_mm`
  on it; one row (decode) is a GEMV over the kept inputs' rows of `packed` when the weight holds it (2 bits
  a weight read, unpacked in registers: `gather_gemv` on uint8), else of `rows`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from zoo.kernels import cpu
from zoo.kernels.dispatch import choose, triton_module


def pack_ternary(w: torch.Tensor) -> torch.Tensor:
    """[out, in] ternary values -> [in, ceil(out/4)] uint8 in the layout above."""
    out, inp = w.shape
    r = -(-out // 4)
    codes = torch.ones(4 * r, inp, dtype=torch.uint8, device=w.device)
    codes[:out] = (w.to(torch.int8) + 1).to(torch.uint8)
    codes = codes.view(4, r, inp)
    packed = codes[0] | (codes[1] << 2) | (codes[2] << 4) | (codes[3] << 6)
    return packed.t().contiguous()


def unpack_ternary(packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """[..., in, ceil(out/4)] uint8 -> [..., out, in] int8 ternary values (inverse of `pack_ternary`;
    leading dims, e.g. stacked MoE experts, are kept)."""
    p = packed.transpose(-2, -1)
    codes = torch.stack([(p >> (2 * s)) & 3 for s in range(4)], -3)  # [..., 4, R, in]
    return (codes.flatten(-3, -2)[..., :out_features, :].to(torch.int8) - 1).contiguous()


@dataclass(frozen=True)
class TernaryWeight:
    """A ternary weight in the layouts its kernels read (either may be None where not needed)."""

    in_features: int
    out_features: int
    packed: torch.Tensor | None = None
    int8: torch.Tensor | None = None
    rows: torch.Tensor | None = None

    @classmethod
    def from_ternary(cls, w: torch.Tensor, layouts: tuple[str, ...] = ("packed", "int8")) -> TernaryWeight:
        """From [out, in] ternary values, keeping the named layouts."""
        return cls(w.shape[1], w.shape[0], pack_ternary(w) if "packed" in layouts else None,
                   w.to(torch.int8).contiguous() if "int8" in layouts else None,
                   w.to(torch.int8).t().contiguous() if "rows" in layouts else None)

    def values(self) -> torch.Tensor:
        """[out, in] int8 ternary values, from whichever layout is held."""
        if self.int8 is not None:
            return self.int8
        return self.rows.t() if self.rows is not None else unpack_ternary(self.packed, self.out_features)


def _dense_rows(xq: torch.Tensor, indices: torch.Tensor | None, in_features: int) -> torch.Tensor:
    """The full int8 rows [N, in] (scattering the kept entries when `indices` is given)."""
    if indices is None:
        return xq
    return xq.new_zeros(xq.shape[0], in_features).scatter_(1, indices.long(), xq)


def finish(acc: torch.Tensor, row_scale: torch.Tensor, bias: torch.Tensor | None,
           out_dtype: torch.dtype) -> torch.Tensor:
    """row_scale · acc (+ bias) in out_dtype, computed in float32 at least: the epilogue all paths share."""
    wide = torch.promote_types(out_dtype, torch.float32)
    y = acc.to(wide) * row_scale.to(wide)[:, None]
    return (y if bias is None else y + bias.to(wide)).to(out_dtype)


def ternary_matmul_reference(xq: torch.Tensor, weight: TernaryWeight, row_scale: torch.Tensor,
                             indices: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                             out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The definition, in float64."""
    x = _dense_rows(xq, indices, weight.in_features).double()
    return finish(x @ weight.values().double().t(), row_scale.double(), bias, out_dtype)


def int_mm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x int8 [N, K] · w ternary int8 [K, M] → int32, exactly: `torch._int_mm`, or, on a CPU where it has no
    fast path (no VNNI: `cpu.fast_matmul`), torch's fp32 GEMM, which is exact here: every partial sum is an
    integer of magnitude at most 128·K (|w| ≤ 1), below 2^24 for K < 131072."""
    if x.device.type != "cpu" or cpu.fast_matmul(torch.int8) or x.shape[1] >= 1 << 17:
        return torch._int_mm(x, w)
    return (x.float() @ w.float()).to(torch.int32)


def ternary_matmul_torch(xq: torch.Tensor, weight: TernaryWeight, row_scale: torch.Tensor,
                         indices: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                         out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """CPU path: `torch._int_mm` on the int8 layout (int32 accumulation, exact).

    With `indices` the kept entries are scattered back into a dense int8 row: on CPU the dense
    int8 GEMV (a quarter of fp32's bytes) is faster than any torch gather of int8 rows.
    """
    if weight.int8 is None and weight.rows is None:
        raise ValueError("the torch ternary path needs the int8 or rows layout (TernaryWeight.from_ternary)")
    x = _dense_rows(xq, indices, weight.in_features)
    w = weight.int8.t() if weight.int8 is not None else weight.rows
    return finish(int_mm(x, w), row_scale, bias, out_dtype)


def ternary_matmul_cpu(xq: torch.Tensor, weight: TernaryWeight, row_scale: torch.Tensor,
                       indices: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                       out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Compiled CPU path on the `rows` layout [in, out]: one row through zoo's gather-GEMV (the kept
    rows only, when `indices` is given; exact integer sums) on the packed 2-bit bytes when held, else on
    the int8 rows; more rows through `torch._int_mm` on the int8 rows."""
    if weight.rows is None:
        raise ValueError("the cpu ternary path needs the rows layout (TernaryWeight.from_ternary(w, ('rows',)))")
    if xq.shape[0] == 1:  # packed: 4 outputs a byte, the padding columns cut off
        w = weight.packed if weight.packed is not None else weight.rows
        acc = cpu.gather_gemv(xq.float(), indices, w)[:, :weight.out_features]
    else:
        acc = int_mm(_dense_rows(xq, indices, weight.in_features), weight.rows)
    return finish(acc, row_scale, bias, out_dtype)


def ternary_matmul(xq: torch.Tensor, weight: TernaryWeight, row_scale: torch.Tensor,
                   indices: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                   out_dtype: torch.dtype = torch.float32, impl: str = "auto") -> torch.Tensor:
    """y [N, out] = row_scale · (xq · w̃ᵀ) (+ bias); xq int8 [N, in], or [N, K] kept entries at `indices`.

    `impl`: 'auto' (Triton on CUDA; on CPU the compiled path when the weight holds the `rows` layout and
    the kernels are built, else torch), 'reference', 'torch', 'cpu', 'triton'.
    """
    impl = choose(impl, xq.device, cpu_kernel=impl == "auto" and weight.rows is not None and cpu.available())
    if impl == "triton":
        kernel = triton_module("triton_ternary", xq.device).ternary_matmul
    elif impl == "cpu":
        kernel = ternary_matmul_cpu
    else:
        kernel = ternary_matmul_reference if impl == "reference" else ternary_matmul_torch
    return kernel(xq, weight, row_scale, indices, bias, out_dtype)


def quantize_rows(x: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """BitNet per-token absmax int8: (round(x·s) clamped to [-128, 127], s = 127 / max|x|)."""
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    s = 127.0 / x.abs().amax(-1, keepdim=True).clamp(min=eps)
    return (x * s).round().clamp(-128, 127).to(torch.int8), s.squeeze(-1)
