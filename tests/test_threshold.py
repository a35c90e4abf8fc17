"""The `threshold` sparsity kind (TEAL-style) and `zoo calibrate`: thresholds at the calibrated quantile,
stored with the checkpoint, and the measured sparsity where the calibration says it is."""

from __future__ import annotations

import json

import pytest
import torch

import zoo
from tests.conftest import tiny
from zoo.blocks.sparsity import kernel_selects
from zoo.blocks.threshold import Threshold
from zoo.contracts import Sparsity
from zoo.eval.calibrate import calibrate


def test_threshold_keeps_entries_above_t_with_straight_through_gradient():
    block = Threshold(7, keep=0.5)
    block.threshold.fill_(0.6)
    x = torch.tensor([[0.1, -0.7, 0.6, 2.0, -0.5, 0.61, -3.0]], requires_grad=True)
    y = block(x)
    assert torch.equal(y, x * torch.tensor([[0, 1, 0, 1, 0, 1, 1.0]]))  # |x| > t, t itself dropped
    y.sum().backward()
    assert x.grad.tolist() == [[1.0] * 7]  # STE
    assert block.keep_fraction == 0.5


def test_threshold_declares_its_contract_honestly():
    """A Sparsity (Registry.build's contract check accepts it in every projection): the expected kept fraction,
    no fixed K per row, and not a top-K, so no kernel selects its entries itself."""
    model = zoo.build(tiny("model.sparsity={kind='threshold', keep=0.4}"))
    blocks = [m for m in model.modules() if isinstance(m, Threshold)]
    assert blocks and all(isinstance(b, Sparsity) for b in blocks)
    b = blocks[0]
    assert b.keep_fraction == 0.4 and b.kept_count(b.width) is None and not kernel_selects(b)
    with pytest.raises(ValueError, match="no fixed number"):
        b.entries(torch.ones(2, b.width))


def test_calibration_sets_each_threshold_at_the_quantile_of_its_dense_input():
    torch.manual_seed(0)
    dense = zoo.build(tiny())
    model = zoo.build(tiny("model.sparsity={kind='threshold', keep=0.3}"))
    missing, unexpected = model.load_state_dict(dense.state_dict(), strict=False)
    assert not unexpected and all(m.endswith("sparsify.threshold") for m in missing) and missing
    x = torch.randint(0, 256, (3, 17), generator=torch.Generator().manual_seed(1))
    inputs = {}

    def record(name):
        def hook(module, args):
            inputs[name] = args[0].abs().flatten()
        return hook

    hooks = [m.register_forward_pre_hook(record(n)) for n, m in dense.named_modules() if n.endswith("sparsify")]
    with torch.no_grad():
        dense(x)
    for h in hooks:
        h.remove()
    found = calibrate(model, [(x, x)])
    assert set(found) == set(inputs)
    for name, t in found.items():  # every entry was sampled (fewer than SAMPLE): the exact quantile
        assert t == pytest.approx(float(torch.quantile(inputs[name].double(), 0.7)), rel=1e-5)
    first = model.blocks[0].attn.qkv  # its input does not depend on any other threshold
    kept = []
    first.sparsify.register_forward_hook(lambda mod, a, out: kept.append(float((out != 0).float().mean())))
    with torch.no_grad():
        model(x)
    assert kept[0] == pytest.approx(0.3, abs=0.01)


def test_zoo_calibrate_writes_a_checkpoint_with_its_thresholds(tmp_path, cli):
    torch.manual_seed(0)
    zoo.save(zoo.build(tiny()), tmp_path / "base")
    r = cli("calibrate", tmp_path / "base", "--sparsity", "0.6", "--out", tmp_path / "cal", "--batches", "1")
    assert r.code == 0, r.err
    model = zoo.load(tmp_path / "cal")
    assert model.recipe.model.sparsity.kind == "threshold" and model.recipe.model.sparsity.config.keep == 0.4
    assert model.recipe.model.ffn.config.act_sparsity.kind == "threshold"
    ts = [float(m.threshold) for m in model.modules() if isinstance(m, Threshold)]
    assert len(ts) == 2 * 5 and all(t > 0 for t in ts)  # qkv, o, up_gate, after the SiLU, down; 2 layers
    meta = json.loads((tmp_path / "cal" / "meta.json").read_text())
    assert meta["source"]["calibration"]["sparsity"] == 0.6
    report = json.loads(cli("eval", tmp_path / "cal", "--batches", "1", "--json").out)
    assert 0.45 < report["sparsity"]["overall"] < 0.75
    r = cli("calibrate", tmp_path / "base", "--sparsity", "1.5", "--out", tmp_path / "x")
    assert r.code == 2 and "--sparsity" in r.err and not (tmp_path / "x").exists()
