"""Set a built model up for fast inference: every block that has an inference form switches to it.

The forms belong to the blocks (zoo/contracts.py): a projection asks its weights block for
`inference_form(sparsify, device, dtype, impl)` — full precision gives `TopKLinear` /
`TransposedLinear` (zoo/blocks/weights.py), frozen BitNet `TernaryLinear` (zoo/blocks/bitnet.py), a
plugin's weights kind its own — and stacked MoE experts, which keep running through their kernel
backend, get `prepare_stacked(dtype)`; the model switches an untied LM head to the Wt layout.

The outputs equal the unprepared model's up to rounding, and state dicts keep their keys, so a
prepared model still saves to an ordinary checkpoint.
"""

from __future__ import annotations

import torch
from torch import nn

from zoo.contracts import Preparable


@torch.no_grad()
def prepare_inference(model: nn.Module, impl: str = "auto") -> nn.Module:
    """Switch every `Preparable` module of `model` to its inference form (in place); returns the model.

    Call it after moving the model to its device and dtype, and after `freeze()` for BitNet.
    `impl` forces the kernels' implementation ('auto': Triton on CUDA; on CPU zoo's compiled kernels
    where they are built, else torch; 'torch': torch's own ops only).
    """
    dtype = dtype_of(model)
    for module in [m for m in model.modules() if isinstance(m, Preparable)]:
        module.prepare_inference(dtype, impl)
    return model


def dtype_of(model: nn.Module) -> torch.dtype:
    """The model's compute dtype: that of its first floating-point parameter or buffer."""
    tensors = (*model.parameters(), *model.buffers())
    return next((t.dtype for t in tensors if t.is_floating_point()), torch.get_default_dtype())
