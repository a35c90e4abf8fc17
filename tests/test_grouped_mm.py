"""The kernel-backend contract grouped_mm(x, w, offsets, rows) for the built-in torch paths, against float64."""

import pytest
import torch

import zoo
from zoo.kernels.grouped import equal_groups, grouped_mm_equal, grouped_mm_loop, grouped_mm_supported, grouped_mm_torch


def groups(counts):
    return torch.cumsum(torch.tensor(counts), 0).to(torch.int32)


def reference(x, w, counts):
    rows, start = [], 0
    for e, c in enumerate(counts):
        rows += [x[r] @ w[e].T for r in range(start, start + c)]
        start += c
    return torch.stack(rows) if rows else x.new_zeros(0, w.shape[1])


def torch_backend(**cfg):
    entry = zoo.get_registry().get("kernel-backend", "torch")
    return entry.factory(entry.config(**cfg), None)


@pytest.mark.parametrize("counts", [[3, 0, 5, 1], [0, 0, 7], [4], [2, 9, 0, 0, 1], [3, 3, 3]])
@pytest.mark.parametrize("impl", [grouped_mm_loop, grouped_mm_torch, torch_backend().grouped_mm])
def test_grouped_mm_equals_per_row_float64_with_gradients(impl, counts):
    torch.manual_seed(sum(counts))
    E, n_in, n_out = len(counts), 5, 7
    x = torch.randn(sum(counts), n_in, dtype=torch.float64, requires_grad=True)
    w = torch.randn(E, n_out, n_in, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(impl(x, w, groups(counts)), reference(x, w, counts), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x, w: impl(x, w, groups(counts)), (x, w))


def test_equal_groups_run_as_one_batched_matmul():
    assert equal_groups(groups([4, 4, 4])) == 4
    assert equal_groups(groups([4, 5, 3])) is None and equal_groups(groups([0, 0])) is None
    x, w = torch.randn(12, 8, dtype=torch.float64), torch.randn(3, 6, 8, dtype=torch.float64)
    torch.testing.assert_close(grouped_mm_equal(x, w, 4), reference(x, w, [4, 4, 4]))


def test_torch_grouped_mm_path_in_float32():
    counts = [5, 0, 11, 3]
    x = torch.randn(sum(counts), 8)
    w = torch.randn(4, 12, 8, requires_grad=True)
    assert grouped_mm_supported(x, w)
    torch.testing.assert_close(grouped_mm_torch(x, w, groups(counts)).double(),
                               reference(x.double(), w.double(), counts), rtol=1e-5, atol=1e-5)


def test_torch_backend_pads_only_balanced_groups_while_training():
    backend = torch_backend(pad_limit=1.25)
    balanced, skewed = torch.tensor([10, 11, 9, 10]), torch.tensor([37, 1, 1, 1])
    assert backend.rows_per_expert(balanced) == 11
    assert backend.rows_per_expert(skewed) is None
    with torch.no_grad():
        assert backend.rows_per_expert(balanced) is None
    assert torch_backend(pad_limit=1.0).rows_per_expert(balanced) is None


@pytest.mark.parametrize("counts", [[3, 0, 5, 1], [4, 4, 4]])
@pytest.mark.parametrize("loop", [False, True])
def test_grouped_mm_gathers_token_rows(counts, loop):
    """With `rows`, x holds tokens in any order and sorted row r is x[rows[r]] (tokens repeat, some are unused)."""
    torch.manual_seed(len(counts) + loop)
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(len(counts), 6, 5, dtype=torch.float64, requires_grad=True)
    rows = torch.randint(0, 6, (sum(counts),))
    impl = torch_backend(grouped_mm=not loop).grouped_mm
    torch.testing.assert_close(impl(x, w, groups(counts), rows), reference(x[rows], w, counts), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x, w: impl(x, w, groups(counts), rows), (x, w))
