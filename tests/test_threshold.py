"""The `threshold` sparsity kind (TEAL-style) and `zoo calibrate`: thresholds at the calibrated quantile,
stored with the checkpoint, and the measured sparsity where the calibration says it is."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import zoo
from tests.conftest import needs_cxx, tiny
from zoo.bench.decode import decode_nbytes
from zoo.blocks.sparsity import kernel_selects
from zoo.blocks.threshold import Threshold
from zoo.contracts import Sparsity
from zoo.eval.calibrate import BINS, Magnitudes, calibrate
from zoo.kernels import cpu, prepare_inference
from zoo.model.projection import Projection


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


def exact(x: torch.Tensor, keep: float) -> tuple[float, float]:
    """The float64 reference: the (1 - keep) quantile of |x| and the share of the entries within a relative
    2^-7 of it (what one histogram bin there can hold at most)."""
    a = x.double().abs().flatten()
    t = float(torch.quantile(a, 1 - keep))
    return t, float(((a - t).abs() <= t * 2**-7).double().mean())


def kept(x: torch.Tensor, t: float) -> float:
    return float((x.double().abs() > t).double().mean())


@pytest.mark.parametrize("keep", [0.5, 0.3, 0.93])
def test_magnitude_histogram_quantile_keeps_the_target_within_its_tolerance(keep):
    """Against the exact float64 quantile, on odd sizes fed in pieces: t is within one bin of it, the kept fraction
    of the entries within the returned tolerance of keep, and that tolerance within one bin's worth of them."""
    g = torch.Generator().manual_seed(3)
    normal = torch.randn(3, 1001, 37, generator=g)
    data = {"normal": normal, "heavy-tailed": normal.exp() * torch.randn(3, 1001, 37, generator=g),
            "bfloat16 values": normal.bfloat16().float() * 3.7}
    for kind, x in data.items():
        seen = Magnitudes()
        for piece in x.split([1, 2]):
            seen.add(piece)
        t, tolerance = seen.quantile(1 - keep)
        t_exact, bin_share = exact(x, keep)
        assert abs(t - t_exact) <= t_exact * 2**-7, kind
        assert abs(kept(x, t) - keep) <= tolerance <= bin_share + 1 / x.numel(), kind
        assert tolerance < 0.01, kind  # a few thousandths of these 111,111 entries
        if kind != "bfloat16 values":  # interpolated inside a continuous bin: far below its tolerance
            assert abs(kept(x, t) - keep) < 5e-4, kind
    ties = torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0, 2.0, 3.0])  # no threshold keeps 0.5 of these: t drops the tie
    seen = Magnitudes()
    seen.add(ties)
    t, tolerance = seen.quantile(0.5)
    assert 1.0 <= t < 2.0 and kept(ties, t) == 2 / 7 and tolerance == 4 / 7


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
    for name, (t, tolerance) in found.items():
        t_exact, bin_share = exact(inputs[name], 0.3)
        assert abs(t - t_exact) <= t_exact * 2**-7
        assert abs(kept(inputs[name], t) - 0.3) <= tolerance <= bin_share + 1 / inputs[name].numel()
    first = model.blocks[0].attn.qkv  # its input does not depend on any other threshold
    kept_now = []
    first.sparsify.register_forward_hook(lambda mod, a, out: kept_now.append(float((out != 0).float().mean())))
    with torch.no_grad():
        model(x)
    assert kept_now[0] == pytest.approx(0.3, abs=0.01)


def test_calibration_holds_one_fixed_histogram_per_threshold_whatever_the_number_of_batches(monkeypatch):
    """Every entry of every batch is counted, into the same BINS counts per block: memory does not grow with
    --batches."""
    held = []

    class Recorded(Magnitudes):
        def __init__(self, device):
            super().__init__(device)
            held.append((self, self.counts.data_ptr()))

    monkeypatch.setattr("zoo.eval.calibrate.Magnitudes", Recorded)
    model = zoo.build(tiny("model.sparsity={kind='threshold', keep=0.5}"))
    g = torch.Generator().manual_seed(4)
    for n in (1, 5):
        held.clear()
        batches = [(x, x) for x in torch.randint(0, 256, (n, 3, 17), generator=g)]
        calibrate(model, batches)
        sites = [m for m in model.modules() if isinstance(m, Threshold)]
        assert len(held) == len(sites)
        for (seen, ptr), site in zip(held, sites):
            assert seen.counts.shape == (BINS,) and seen.counts.data_ptr() == ptr  # added to in place
            assert int(seen.counts.sum()) == n * 3 * 17 * site.width  # every entry, none sampled away


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


def calibrated(weights: str = "fp", sparsity: str = "threshold") -> tuple[torch.nn.Module, torch.Tensor]:
    """A tiny model with `sparsity` (keep 0.5) on every projection, thresholds calibrated on random tokens
    (frozen, for BitNet), and those tokens."""
    torch.manual_seed(0)
    model = zoo.build(tiny(f"model.sparsity={{kind='{sparsity}', keep=0.5}}",
                           f"model.weights.kind='{weights}'")).eval()
    ids = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(1))
    if sparsity == "threshold":
        calibrate(model, [(ids, ids)])
    else:  # the same forward as calibration's (it fills the position caches)
        with torch.no_grad():
            model(ids)
    return model.freeze() if weights == "bitnet158" else model, ids


@needs_cxx
@pytest.mark.parametrize("weights,kernel", [("fp", "gather_gemv"), ("bitnet158", "ternary_gemv")])
def test_prepared_threshold_projections_run_the_zero_skipping_kernel(monkeypatch, weights, kernel):
    """After `prepare_inference` every threshold projection of a decoded token is one call of the compiled
    kernel on its threshold-sparse row (the kernel that reads only the nonzero entries' weight rows:
    tests/test_kernels_cpu.py), and the logits are the eager model's."""
    model, ids = calibrated(weights)
    prepared = prepare_inference(copy.deepcopy(model))
    zeros, real = [], getattr(cpu, kernel)

    def counted(x, *args, **kwargs):
        zeros.append(float((x == 0).float().mean()))
        return real(x, *args, **kwargs)

    monkeypatch.setattr(cpu, kernel, counted)
    with torch.no_grad():
        want, got = model(ids[:1, :1]).logits, prepared(ids[:1, :1]).logits
    assert ((got - want).norm() / want.norm()).item() < 1e-5
    sparse = [z for z in zeros if z > 0]  # the untied head's dense row (fp) is the other call
    projections = [m for m in prepared.modules() if isinstance(m, Projection)]
    assert len(sparse) == len(projections) == 4 * model.config.n_layers
    assert 0.3 < sum(sparse) / len(sparse) < 0.7  # calibrated to keep 0.5 on these tokens


@pytest.mark.parametrize("weights", ["fp", "bitnet158"])
def test_threshold_decode_bytes_are_the_declared_keep_like_topk(weights):
    """`bytes_per_token` counts the declared keep share of the weight rows, as for top-K at the same keep
    (equal widths: K = keep · width exactly); the model's decode bytes differ by the thresholds alone."""
    forms = {}
    for sparsity in ("threshold", "topk"):
        model = prepare_inference(calibrated(weights, sparsity)[0])
        forms[sparsity] = [m.linear for m in model.modules() if isinstance(m, Projection)]
        forms[sparsity + " model"] = decode_nbytes(model)
    for thr, top in zip(forms["threshold"], forms["topk"]):
        assert thr.bytes_per_token() == top.bytes_per_token() < thr.inference_nbytes()
    n_thresholds = len(forms["threshold"])
    assert forms["threshold model"] == forms["topk model"] + 4 * n_thresholds
    if weights == "fp" and cpu.available():
        lin = forms["threshold"][0]
        assert lin.bytes_per_token() == lin.in_features // 2 * lin.out_features * 4


@needs_cxx
def test_bench_kernels_prints_a_threshold_row_beside_topk():
    """`zoo bench kernels --only topk` times the threshold-sparse row through the zero-skipping GEMV: its bytes
    are the nonzero entries' weight rows (above the keep quantile of |x|: keep · in of them, as top-K's)."""
    import argparse

    from zoo.bench import kernels

    p = argparse.ArgumentParser()
    kernels.add_arguments(p)
    args = p.parse_args(["--only", "topk", "--shapes", "tiny-down", "--dtype", "float32", "--keep", "0.5",
                         "--repeats", "1", "--device", "cpu"])
    rows = {r["kernel"]: r for r in kernels.measure(args)[1]}
    thr = rows["threshold"]
    assert thr["shape"] == "tiny-down 512->192 float32 b1 keep0.5" and thr["baseline"] == rows["topk"]["baseline"]
    assert thr["floor_ms"] == rows["topk"]["floor_ms"] and thr["speedup_vs_zoo_dense"] > 0
    assert int((kernels.thresholded(torch.randn(1, 512), 0.5) != 0).sum()) == 256
