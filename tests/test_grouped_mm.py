"""The kernel-backend contract grouped_mm(x, w, offsets, rows) for the built-in torch paths, against float64."""

import pytest
import torch

import zoo
from zoo.contracts import KernelBackend
from zoo.kernels.grouped import (
    grouped_mm_loop,
    grouped_mm_split,
    grouped_mm_supported,
    grouped_mm_torch,
)


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


@pytest.mark.parametrize("counts", [[5, 0, 11, 3], [0, 9, 1, 0]])
def test_torch_grouped_mm_path_in_float32_with_gradients(counts):
    """torch._grouped_mm (the torch backend's path on CPU) against float64: output, dx and dw, an empty
    expert's weight gradient written as zeros, and dw in the weight's own layout (no copy when accumulated)."""
    torch.manual_seed(sum(counts))
    x = torch.randn(sum(counts), 8, requires_grad=True)
    w = torch.randn(4, 12, 8, requires_grad=True)
    dy = torch.randn(sum(counts), 12)
    assert grouped_mm_supported(x, w)
    y = torch_backend().grouped_mm(x, w, groups(counts))
    y.backward(dy)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = reference(x64, w64, counts)
    ref.backward(dy.double())
    for got, want in [(y, ref), (x.grad, x64.grad), (w.grad, w64.grad)]:
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert w.grad.is_contiguous()
    for e, c in enumerate(counts):
        assert bool(w.grad[e].any()) == (c > 0)


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


@pytest.mark.parametrize("counts, sizes", [([3, 0, 5, 1], (3, 3)), ([0, 0, 7], (2, 5, 1)), ([2, 9, 0, 0, 1], (4, 2)),
                                           ([0, 0], (3, 3))])
@pytest.mark.parametrize("gather", [False, True])
def test_grouped_mm_split_gives_contiguous_parts_with_gradients(counts, sizes, gather):
    """The split loop (a GLU's gate and up from one stacked weight) against the split float64 reference:
    separate contiguous outputs, gradcheck through all parts, empty experts' weight gradients zero; with
    `rows` each expert gathers its tokens (repeated and unused tokens; dx added back per expert)."""
    torch.manual_seed(sum(counts) + len(sizes) + gather)
    E, n_in = len(counts), 5
    rows = torch.randint(0, 6, (sum(counts),)) if gather else None
    x = torch.randn(7 if gather else sum(counts), n_in, dtype=torch.float64, requires_grad=True)
    w = torch.randn(E, sum(sizes), n_in, dtype=torch.float64, requires_grad=True)
    parts = grouped_mm_split(x, w, groups(counts), sizes, rows)
    assert [p.shape for p in parts] == [(sum(counts), n) for n in sizes] and all(p.is_contiguous() for p in parts)
    for got, want in zip(parts, reference(x if rows is None else x[rows], w, counts).split(sizes, -1), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    weights = [torch.randn(sum(counts), n, dtype=torch.float64) for n in sizes]
    sum(((p * c).sum() for p, c in zip(parts, weights))).backward()
    assert all(not w.grad[e].any() for e, c in enumerate(counts) if c == 0) and w.grad.is_contiguous()
    assert torch.autograd.gradcheck(lambda x, w: grouped_mm_split(x, w, groups(counts), sizes, rows), (x, w))


def test_backend_without_split_gets_its_grouped_mm_split():
    class Plain(KernelBackend):
        def grouped_mm(self, x, w, offsets, rows=None):
            return grouped_mm_loop(x if rows is None else x[rows], w, offsets)

    torch.manual_seed(5)
    x, w, rows = torch.randn(6, 4), torch.randn(3, 8, 4), torch.tensor([5, 0, 0, 2, 3])
    got = Plain().grouped_mm_split(x, w, groups([2, 0, 3]), (5, 3), rows)  # the contract's default
    want = torch_backend().grouped_mm_split(x, w, groups([2, 0, 3]), (5, 3), rows)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
