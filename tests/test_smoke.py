import torch

import zoo
from tests.conftest import RECIPES


def test_tiny_dense_forward_backward():
    recipe = zoo.load_recipe(RECIPES / "tiny/dense.toml", ["model.n_layers=2", "model.d_model=48", "model.n_heads=4"])
    model = zoo.build(recipe)
    x = torch.randint(0, 256, (2, 16))
    out = model(x, x)
    assert torch.isfinite(out.loss)
    out.loss.backward()
