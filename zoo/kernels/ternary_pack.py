"""Packed ternary storage: 2 bits per weight, 4 weights per byte (the layout of transformers' BitNet).

A ternary matrix W̃ ∈ {-1, 0, 1}^(out × in) is stored as `packed`, uint8 of shape
(R, in) with R = ceil(out / 4): bits 2i..2i+1 of packed[r, c] hold W̃[i·R + r, c] + 1
(codes 0, 1, 2 = -1, 0, +1) for i = 0..3. Rows i·R + r >= out do not exist; their bits are 0
and are ignored when unpacking. The dequantized weight is W̃ · scale (one scale per matrix).
"""

from __future__ import annotations

import torch

WEIGHTS_PER_BYTE = 4


def packed_rows(out_features: int) -> int:
    """R: rows of the packed matrix for `out_features` ternary rows."""
    return -(-out_features // WEIGHTS_PER_BYTE)


def pack_ternary(w: torch.Tensor) -> torch.Tensor:
    """Ternary [out, in] (any integer or float dtype holding -1/0/1) -> packed uint8 [ceil(out/4), in]."""
    out, r = w.shape[0], packed_rows(w.shape[0])
    codes = torch.zeros(WEIGHTS_PER_BYTE * r, *w.shape[1:], dtype=torch.uint8, device=w.device)  # pad rows: 0
    codes[:out] = (w.to(torch.int8) + 1).to(torch.uint8)
    groups = codes.view(WEIGHTS_PER_BYTE, r, *w.shape[1:])
    packed = groups[0].clone()
    for i in range(1, WEIGHTS_PER_BYTE):
        packed |= groups[i] << (2 * i)
    return packed


def unpack_ternary(packed: torch.Tensor, out_features: int, dtype: torch.dtype = torch.int8) -> torch.Tensor:
    """Packed uint8 [R, in] -> ternary [out_features, in] in `dtype` (plain torch)."""
    shifts = torch.arange(0, 2 * WEIGHTS_PER_BYTE, 2, device=packed.device, dtype=torch.uint8)
    codes = (packed.unsqueeze(0) >> shifts.view(-1, *([1] * packed.dim()))) & 3
    return (codes.flatten(0, 1)[:out_features].to(torch.int8) - 1).to(dtype)


def packed_nbytes(out_features: int, in_features: int) -> int:
    """Bytes of the packed matrix (without its scale)."""
    return packed_rows(out_features) * in_features
