"""Set a built model up for fast inference: each projection gets the kernel that fits it.

- full-precision weights with a top-K sparsity block (`k` kept inputs per token): `TopKLinear`,
  the weight held once as Wt [in, out] and multiplied by the sparse-input kernel when
  rows · keep < 1 (decode), densely otherwise;
- other full-precision fp32 weights on CPU, and an untied LM head: `TransposedLinear`, the same Wt
  layout; one row goes through zoo's compiled GEMV (zoo/kernels/cpu.py: both cores, ~1.5× faster
  than MKL's one-thread GEMV), more rows, or no compiled kernels, through `x @ Wt` (which reads Wt
  faster than `F.linear` reads W);
- frozen BitNet b1.58 weights (`packed` + `scale`): `TernaryLinear`, int8 activations times the
  ternary weight (CPU: unpacked once to int8 — [in, out] for zoo's compiled GEMV, which at decode
  reads only the kept inputs' rows when the input is top-K sparse, or [out, in] for
  `torch._int_mm` without the compiled kernels; CUDA: the packed Triton kernel, with the top-K
  gather fused in when the projection's input is top-K sparse).

Stacked MoE experts keep running through their kernel backend; frozen BitNet experts are asked to
keep their weights unpacked (`keep_dequantized`: the compute dtype, not saved), since the grouped
matmul takes float weights and would otherwise unpack every expert at every call.

The outputs equal the unprepared model's up to rounding, and state dicts keep their keys, so a
prepared model still saves to an ordinary checkpoint.
"""

from __future__ import annotations

import torch
from torch import nn

from zoo.kernels import cpu
from zoo.kernels.dispatch import choose
from zoo.kernels.ternary import TernaryWeight, quantize_rows, ternary_matmul, unpack_ternary
from zoo.kernels.topk_matmul import gather_pays, topk_matmul


def kept_count(sparsify: nn.Module, width: int) -> int | None:
    """K, the inputs a sparsity block keeps per token, when it keeps exactly K < width (top-K kinds)."""
    k = getattr(sparsify, "k", None)
    return k if isinstance(k, int) and 0 < k < width else None


def top_entries(x: torch.Tensor, k: int, sparsify: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) [N, k]: what the sparsity block keeps of each row of x, from its own selection
    (`entries`, one pass) when it has one; else the k largest |x| of each row of `sparsify(x)`."""
    if sparsify is not None and hasattr(sparsify, "entries"):
        return sparsify.entries(x)
    x = x if sparsify is None else sparsify(x)
    idx = x.abs().topk(k, dim=-1, sorted=False).indices
    return x.gather(-1, idx), idx


def kernel_selects(sparsify: nn.Module | None) -> bool:
    """Whether a fused kernel may take the raw row and select the kept entries itself: no sparsity, or a
    block whose kept entries are the row's k largest |x| (ties to the lower index, unscaled)."""
    return sparsify is None or isinstance(sparsify, nn.Identity) or getattr(sparsify, "magnitude_topk", False)


class TransposedLinear(nn.Module):
    """y = x·Wᵀ (+ b) from the weight held transposed, Wt [in, out] row-major.

    On CPU one row (decode) goes through zoo's compiled GEMV when it is built (`impl` 'auto' or
    'cpu'; both cores stream Wt), else `x @ Wt`, which reads Wt faster than `F.linear` reads W
    [out, in] (MKL's batch-1 GEMV: 10–25 % at decode shapes, docs/benchmarks.md). Saves and loads
    `weight` [out, in] like nn.Linear, so checkpoints do not change.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, impl: str = "auto"):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("wt", weight.detach().t().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.impl = impl
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
        if self.compiled_gemv and rows.shape[0] == 1:
            return cpu.gather_gemv(rows, None, self.wt, self.bias).to(rows.dtype)
        y = rows @ self.wt
        return y if self.bias is None else y + self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(x.reshape(-1, self.in_features)).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{self.in_features}->{self.out_features}, Wt layout"


class TopKLinear(TransposedLinear):
    """y = sparsify(x)·Wᵀ (+ b) for a sparsity block keeping k inputs per row, from Wt [in, out].

    It takes the projection's sparsity block (`sparsify_inside`) so that at decode the kept
    entries are selected once, straight into the (values, indices) form the kernel reads.
    """

    sparsify_inside = True

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, k: int, impl: str = "auto"):
        super().__init__(weight, bias, impl)
        self.k = k

    def forward(self, x: torch.Tensor, sparsify: nn.Module | None = None) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if gather_pays(rows.shape[0], self.k / self.in_features):
            if self.compiled_gemv and kernel_selects(sparsify):
                y = cpu.topk_gemv(rows, self.k, self.wt, self.bias)[0]  # selection and multiply in one call
            else:
                values, idx = top_entries(rows, self.k, sparsify)  # the kernels multiply in wt's dtype
                y = topk_matmul(values, idx, self.wt, self.bias, impl=self.impl)
        else:
            y = self.dense((rows if sparsify is None else sparsify(rows)).to(self.wt.dtype))
        return (y if y.dtype == x.dtype else y.to(x.dtype)).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, k={self.k}"


class TernaryLinear(nn.Module):
    """A frozen BitNet projection: norm, optional top-K, int8 per-token activations × ternary weight · β
    (β one per matrix or one per output row)."""

    sparsify_inside = True

    def __init__(self, bitlinear: nn.Module, device: torch.device, impl: str = "auto"):
        super().__init__()
        self.in_features, self.out_features = bitlinear.in_features, bitlinear.out_features
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
        return TernaryWeight(self.in_features, self.out_features, **{self.layout: self.kernel_weight})

    def fused(self, x: torch.Tensor, sparsify: nn.Module | None) -> bool:
        """Whether one `cpu.ternary_gemv` call does it all: the compiled kernels, one fp32 row (decode),
        and no sparsity or a top-K the kernel selects itself."""
        return (self.layout == "rows" and x.dtype == torch.float32 and x.numel() == self.in_features
                and kernel_selects(sparsify))

    def forward(self, x: torch.Tensor, sparsify: nn.Module | None = None) -> torch.Tensor:
        x = self.norm(x)
        if self.fused(x, sparsify):
            k = 0 if sparsify is None else kept_count(sparsify, self.in_features) or 0
            y = cpu.ternary_gemv(x.reshape(1, -1), k, self.kernel_weight, self.scale, self.bias)
            return y.view(*x.shape[:-1], self.out_features)
        if sparsify is not None:
            x = sparsify(x)
        rows = x.reshape(-1, self.in_features)
        xq, s = quantize_rows(rows)
        k = None if sparsify is None else kept_count(sparsify, self.in_features)
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

    def extra_repr(self) -> str:
        kind = {"packed": "packed 2-bit, Triton", "rows": "int8 [in, out], zoo cpu",
                "int8": "int8, torch._int_mm"}[self.layout]
        return f"{self.in_features}->{self.out_features}, {kind}"


@torch.no_grad()
def prepare_inference(model: nn.Module, impl: str = "auto") -> nn.Module:
    """Swap every projection's weights module for its inference kernel (in place); returns the model.

    Call it after moving the model to its device and dtype, and after `freeze()` for BitNet.
    `impl` forces the kernels' implementation ('auto': Triton on CUDA; on CPU zoo's compiled kernels
    where they are built, else torch; 'torch': torch's own ops only).
    """
    from zoo.model.projection import ExpertProjection, Projection

    for proj in model.modules():
        if isinstance(proj, ExpertProjection):  # stacked experts run through their MoE kernel backend
            keep = getattr(proj.linear, "keep_dequantized", None)
            if keep is not None:  # a frozen weights block that would rebuild its float weights per call
                keep(dtype_of(model))
            continue
        if not isinstance(proj, Projection):
            continue
        linear, device = proj.linear, next(proj.parameters(), next(proj.buffers(), None)).device
        k = kept_count(proj.sparsify, proj.in_features)
        if getattr(linear, "sparsify_inside", False) and hasattr(linear, "packed"):
            proj.linear = TernaryLinear(linear, device, impl)
        elif isinstance(linear, nn.Linear) and k is not None:
            proj.linear = TopKLinear(linear.weight, linear.bias, k, impl)
        elif isinstance(linear, nn.Linear) and transposed_pays(linear.weight):
            proj.linear = TransposedLinear(linear.weight, linear.bias, impl)
    head, embed = getattr(model, "head", None), getattr(model, "embed", None)
    tied = embed is not None and head is not None and head.weight is embed.weight
    if isinstance(head, nn.Linear) and not tied and transposed_pays(head.weight):
        model.head = TransposedLinear(head.weight, head.bias, impl)  # an untied LM head is one more dense GEMV
    return model


def dtype_of(model: nn.Module) -> torch.dtype:
    """The model's compute dtype: that of its first floating-point parameter or buffer."""
    tensors = (*model.parameters(), *model.buffers())
    return next((t.dtype for t in tensors if t.is_floating_point()), torch.get_default_dtype())


def transposed_pays(weight: torch.Tensor) -> bool:
    """Whether a dense projection decodes faster from Wt: fp32 on CPU (`x @ Wt` vs `F.linear`, measured;
    bf16 is the other way round there, and CUDA's GEMV reads either layout at full speed)."""
    return weight.device.type == "cpu" and weight.dtype == torch.float32
