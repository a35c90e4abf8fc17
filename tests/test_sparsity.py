"""Q-Sparse top-K and Block Q-Sparse (N:M): exact K, largest |x|, ties, STE, rescale, recipe errors."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import zoo
from tests.conftest import RECIPES
from zoo.blocks.sparsity import BlockTopK, TopK, topk_indices, topk_mask


def reference_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Float64 reference: rank by (-|x|, index), keep the first k of each row."""
    a = x.double().abs().reshape(-1, x.shape[-1])
    mask = torch.zeros_like(a, dtype=torch.bool)
    for r in range(a.shape[0]):
        order = sorted(range(a.shape[1]), key=lambda j: (-a[r, j].item(), j))
        mask[r, order[:k]] = True
    return mask.reshape(x.shape)


@pytest.mark.parametrize("width,keep", [(37, 0.5), (53, 0.3), (11, 0.99), (64, 0.7)])
def test_topk_keeps_exactly_k_largest(width, keep):
    torch.manual_seed(width)
    x = torch.randn(3, 5, width)
    block = TopK(width, int(keep * width))
    y = block(x)
    k = int(keep * width)
    assert ((y != 0).sum(-1) == k).all()
    assert torch.equal(y != 0, reference_mask(x, k))
    assert torch.equal(y[y != 0], x[y != 0])


def test_ties_are_exact_k_and_go_to_the_lower_index():
    torch.manual_seed(1)
    x = torch.randint(-3, 4, (40, 23)).float()  # many ties, zeros included
    for k in (1, 5, 11, 22):
        mask = topk_mask(x.abs(), k)
        assert (mask.sum(-1) == k).all()
        assert torch.equal(mask, reference_mask(x, k))



@pytest.mark.parametrize("block", [TopK(37, 15), TopK(24, 9, rescale=True), BlockTopK(32, 3, 8, rescale=True)])
def test_entries_are_the_forward_output_non_zeros_in_index_order(block):
    x = torch.randn(6, block.width, dtype=torch.float64)
    x[0, :6] = 1.0  # ties at the threshold
    values, idx = block.entries(x)
    assert values.shape == idx.shape == (6, block.k)
    assert (idx[:, 1:] > idx[:, :-1]).all()
    dense = torch.zeros_like(x).scatter_(1, idx, values)
    assert torch.allclose(dense, block(x), rtol=1e-12, atol=0)

@pytest.mark.parametrize("rows,width", [(1, 1024), (1, 2731), (3, 37), (9, 130), (1, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_topk_indices_are_the_mask_entries_in_order(rows, width, dtype):
    """The NumPy fast path (no ties at the threshold) and the mask path (ties) give the mask's entries."""
    x = torch.randn(rows, width, dtype=torch.float64).to(dtype)
    tied = x.clone()
    tied[0, : width // 2 + 1] = 1.0  # ties straddling the threshold of row 0
    for a in (x.abs(), tied.abs()):
        for k in {0, 1, width // 3, width // 2, width - 1, width}:
            idx = topk_indices(a, k)
            assert idx.shape == (rows, k) and idx.dtype == torch.int64
            expected = reference_mask(a.double(), k).nonzero()[:, -1].view(rows, k)
            assert torch.equal(idx, expected)


@pytest.mark.parametrize("rows,width", [(1, 2731), (4, 77)])
def test_topk_indices_without_ties_skip_the_mask(rows, width, monkeypatch):
    """Distinct magnitudes take the NumPy path alone (the mask is never built) and still give its entries."""
    x = (torch.randperm(rows * width).view(rows, width) + 1.0) * torch.randn(rows, width).sign()
    expected = {k: reference_mask(x, k).nonzero()[:, -1].view(rows, k) for k in (1, width // 2, width - 1)}
    monkeypatch.setattr("zoo.blocks.sparsity.topk_mask", lambda *a: pytest.fail("mask path taken"))
    for k, idx in expected.items():
        assert torch.equal(topk_indices(x.abs(), k), idx)


def test_topk_entries_of_a_decode_row_match_forward():
    """A batch-1 decode row (the fast path of `entries`) against the float64 forward, fresh inputs, odd width."""
    block = TopK(1365, 682, rescale=True)
    x = torch.randn(1, 1365, requires_grad=True)
    values, idx = block.entries(x)
    dense = torch.zeros(1, 1365, dtype=torch.float64).scatter_(1, idx, values.double())
    torch.testing.assert_close(dense, block(x.detach().double()), rtol=1e-6, atol=1e-7)
    assert not values.requires_grad


def test_k_zero_and_k_width():
    x = torch.randn(4, 9)
    assert torch.equal(TopK(9, 0)(x), torch.zeros_like(x))
    assert torch.equal(TopK(9, 0, rescale=True)(x), torch.zeros_like(x))
    assert torch.equal(TopK(9, 9, rescale=True)(x), x)
    assert torch.equal(TopK(9, 9)(x), x)
    assert TopK(9, 3).keep_fraction == pytest.approx(3 / 9)


@pytest.mark.parametrize("n,m,width", [(2, 4, 36), (16, 32, 64), (3, 7, 21), (0, 5, 10), (5, 5, 15)])
def test_block_topk_keeps_n_largest_per_block(n, m, width):
    torch.manual_seed(n * 100 + m)
    x = torch.randn(6, width)
    y = BlockTopK(width, n, m)(x)
    blocks_x, blocks_y = x.unflatten(-1, (width // m, m)), y.unflatten(-1, (width // m, m))
    assert ((blocks_y != 0).sum(-1) == n).all()
    assert torch.equal(blocks_y != 0, reference_mask(blocks_x, n))
    assert BlockTopK(width, n, m).keep_fraction == pytest.approx(n / m)


@pytest.mark.parametrize("block", [TopK(29, 10, ste=True), BlockTopK(30, 2, 5, ste=True)])
def test_ste_gradient_reaches_every_input(block):
    x = torch.randn(4, block.width, dtype=torch.float64, requires_grad=True)
    g = torch.randn(4, block.width, dtype=torch.float64)
    block(x).backward(g)
    assert torch.equal(x.grad, g)


@pytest.mark.parametrize("block", [TopK(29, 10, ste=False), BlockTopK(30, 2, 5, ste=False)])
def test_without_ste_the_gradient_is_masked(block):
    x = torch.randn(4, block.width, dtype=torch.float64, requires_grad=True)
    g = torch.randn(4, block.width, dtype=torch.float64)
    y = block(x)
    y.backward(g)
    assert torch.equal(x.grad, g * (y != 0))


def test_rescale_restores_the_l2_norm_and_scales_the_gradient():
    x = torch.randn(5, 31, dtype=torch.float64, requires_grad=True)
    y = TopK(31, 8, rescale=True)(x)
    full, kept = x.detach().norm(dim=-1, keepdim=True), (x.detach() * (y != 0)).norm(dim=-1, keepdim=True)
    torch.testing.assert_close(y.norm(dim=-1, keepdim=True), full)
    torch.testing.assert_close(y, x.detach() * (y != 0) * full / kept)
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, g * full / kept)


def test_role_overrides_set_keep_per_projection():
    recipe = zoo.load_recipe(RECIPES / "tiny/qsparse.toml", ["model.sparsity.roles.down.keep=0.25",
                                                               "model.sparsity.roles.qkv.kind=none"])
    model = zoo.build(recipe, device="meta")
    ffn, attn = model.blocks[0].ffn, model.blocks[0].attn
    assert ffn.down.keep == pytest.approx(0.25)
    assert ffn.up_gate.keep == pytest.approx(0.5)
    assert attn.qkv.keep == 1.0
    acc = zoo.account(model)
    assert acc.by_role["down"]["activated"] == pytest.approx(0.25 * acc.by_role["down"]["params"])


@pytest.mark.parametrize("overrides,path,words", [
    (["model.sparsity.keep=0"], "model.sparsity.keep", "> 0"),
    (["model.sparsity.keep=1.5"], "model.sparsity.keep", "<= 1"),
    (["model.sparsity.roles.down.keep=-0.1"], "model.sparsity.roles.down.keep", "> 0"),
    (["model.sparsity.kind=block_topk", "model.sparsity.n=9", "model.sparsity.m=8"], "model.sparsity.n", "<= m"),
    (["model.sparsity.kind=block_topk", "model.sparsity.n=4", "model.sparsity.m=7"], "model.sparsity.m",
     "does not divide"),
    (["model.sparsity.kind=block_topk", "model.sparsity.roles.down.m=30"], "model.sparsity.roles.down.m",
     "does not divide"),
    (["model.sparsity.kind=topk", "model.sparsity.stee=false"], "model.sparsity.stee", 'did you mean "ste"'),
])
def test_bad_values_are_recipe_errors_with_key_paths(overrides, path, words):
    base = ["model.sparsity.keep=0.5"] if "model.sparsity.kind=block_topk" not in overrides else []
    with pytest.raises(zoo.RecipeError) as err:
        zoo.build(zoo.load_recipe(RECIPES / "tiny/dense.toml", ["model.sparsity.kind=topk", *base, *overrides]),
                  device="meta")
    assert err.value.path == path
    assert words in str(err.value)


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 6), width=st.integers(1, 40), data=st.data())
def test_topk_mask_property_exact_k_largest_lowest_index_ties(rows, width, data):
    k = data.draw(st.integers(0, width))
    values = data.draw(st.lists(st.sampled_from([0.0, 0.5, -0.5, 1.0, -2.0, 3.25]) | st.floats(-4, 4, width=32),
                                min_size=rows * width, max_size=rows * width))
    x = torch.tensor(values, dtype=torch.float32).view(rows, width)
    mask = topk_mask(x.abs(), k)
    assert torch.equal(mask, reference_mask(x, k))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_keep_exact_k(dtype):
    torch.manual_seed(7)
    x = torch.randn(8, 45).to(dtype)
    y = TopK(45, 17)(x)
    assert y.dtype == dtype and ((y != 0).sum(-1) == 17).all()
    assert torch.equal(y != 0, reference_mask(x.float(), 17))


@pytest.mark.gpu
def test_topk_on_cuda_matches_the_reference():
    x = torch.randint(-3, 4, (64, 33)).float()
    for k in (1, 16, 32):
        assert torch.equal(topk_mask(x.cuda().abs(), k).cpu(), reference_mask(x, k))
