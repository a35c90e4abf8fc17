"""The kernel-backend contract grouped_mm(x, w, offsets) for the built-in torch methods, against float64."""

import pytest
import torch

import zoo
from zoo.kernels.grouped import grouped_mm_loop, grouped_mm_padded, grouped_mm_supported, grouped_mm_torch


def groups(counts):
    return torch.cumsum(torch.tensor(counts), 0).to(torch.int32)


def reference(x, w, counts):
    rows, start = [], 0
    for e, c in enumerate(counts):
        rows += [x[r] @ w[e].T for r in range(start, start + c)]
        start += c
    return torch.stack(rows) if rows else x.new_zeros(0, w.shape[1])


@pytest.mark.parametrize("counts", [[3, 0, 5, 1], [0, 0, 7], [4], [2, 9, 0, 0, 1]])
@pytest.mark.parametrize("impl", [grouped_mm_loop, grouped_mm_padded, grouped_mm_torch])
def test_grouped_mm_equals_per_row_float64_with_gradients(impl, counts):
    torch.manual_seed(sum(counts))
    E, n_in, n_out = len(counts), 5, 7
    x = torch.randn(sum(counts), n_in, dtype=torch.float64, requires_grad=True)
    w = torch.randn(E, n_out, n_in, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(impl(x, w, groups(counts)), reference(x, w, counts), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x, w: impl(x, w, groups(counts)), (x, w))


def test_torch_grouped_mm_path_in_float32():
    counts = [5, 0, 11, 3]
    x = torch.randn(sum(counts), 8)
    w = torch.randn(4, 12, 8, requires_grad=True)
    assert grouped_mm_supported(x, w)
    torch.testing.assert_close(grouped_mm_torch(x, w, groups(counts)).double(),
                               reference(x.double(), w.double(), counts), rtol=1e-5, atol=1e-5)


def test_torch_backend_auto_on_balanced_and_skewed_groups():
    registry = zoo.get_registry()
    backend = registry.get("kernel-backend", "torch").factory(
        registry.get("kernel-backend", "torch").config(), None)
    x = torch.randn(40, 8)
    w = torch.randn(4, 4, 8)
    for counts in ([10, 10, 10, 10], [37, 1, 1, 1]):
        torch.testing.assert_close(backend.grouped_mm(x, w, groups(counts)), reference(x, w, counts))
