"""zoo generate / eval / scaling fit / quickstart on tiny runs."""

import json

import numpy as np
import pytest

from tests.tiny import tiny_run
from zoo.eval.scaling import law
from zoo.train.loop import train


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gen")
    r = tiny_run(tmp, **{"train.steps": 3, "data.tokenizer": {"kind": "bpe", "vocab_size": 300},
                         "model.vocab_size": 300})
    train(r, tmp / "run", progress=False)
    return tmp / "run"


def test_generate_streams_a_continuation_with_the_runs_tokenizer(run, cli):
    assert (run / "checkpoints" / "step-00000003" / "tokenizer.json").is_file()
    a = cli("generate", run, "--prompt", "the lord", "--max-new-tokens", "8", "--seed", "3", "--top-k", "20")
    b = cli("generate", run, "--prompt", "the lord", "--max-new-tokens", "8", "--seed", "3", "--top-k", "20")
    assert a.code == 0 and a.out == b.out and a.out.startswith("the lord") and len(a.out) > len("the lord\n")
    g = cli("generate", run, "--prompt", "the lord", "--max-new-tokens", "4", "--temperature", "0", "--top-p", "0.9")
    assert g.code == 0 and g.out.startswith("the lord")


def test_generate_bad_inputs(run, tmp_path, cli):
    assert cli("generate", run, "--prompt", "").code == 2
    bad = cli("generate", tmp_path / "nothing", "--prompt", "x")
    assert bad.code == 2 and "no such checkpoint or run folder" in bad.err
    assert cli("generate", run, "--prompt", "x", "--top-p", "1.5").code == 2


def fake_run(folder, n, s, loss):
    """A finished-run folder whose summary says: n non-embedding params, sparsity s, val loss."""
    folder.mkdir(parents=True)
    (folder / "recipe.toml").write_text(f'name = "{folder.name}"\n')
    (folder / "metrics.jsonl").write_text(json.dumps({"split": "val", "step": 1, "tokens": 1, "val_loss": loss}) + "\n")
    acc = {"total_params": n, "activated_params": n * (1 - s), "flops_per_token": 2 * n,
           "non_embedding_params": n, "sparsity": s}
    (folder / "summary.json").write_text(json.dumps({
        "val_loss": loss, "train_loss": loss, "val_ppl": float(np.exp(loss)), "sparsity": {"overall": s},
        "train_tokens_per_s": 1.0, "decode_tokens_per_s": 1.0, "tokens": 1, "accounting": acc}))


def test_scaling_fit_cli(tmp_path, cli):
    consts = {"E": 1.2, "B": 0.2, "C": 3.0, "alpha": 0.3, "beta": 0.1}
    for n in (1e5, 1e6, 1e7):
        for s in (0.0, 0.4, 0.7):
            fake_run(tmp_path / "runs" / f"n{n:g}-s{s}", n, s, float(law(n, s, **consts)))
    res = cli("scaling", "fit", tmp_path / "runs", "--json", "--bootstrap", "4", "--plot", tmp_path / "fit.png")
    assert res.code == 0, res.err
    out = json.loads(res.out)
    assert out["alpha"] == pytest.approx(0.3, rel=0.05) and out["runs"] == 9 and len(out["data"]) == 9
    lo, hi = out["intervals"]["optimal_sparsity"]
    assert out["bootstrap"] == 4 and lo - 1e-6 <= out["optimal_sparsity"] <= hi + 1e-6
    assert [h["N"] for h in out["held_out"]] == [100_000, 1_000_000, 10_000_000]
    assert max(h["max_abs_rel_error"] for h in out["held_out"]) < 1e-3
    assert out["warnings"] == [] and "warning" not in res.err
    assert (tmp_path / "fit.png").stat().st_size > 10_000
    text = cli("scaling", "fit", tmp_path / "runs", "--bootstrap", "4")
    assert "optimal sparsity S*" in text.out and "4 bootstrap resamples" in text.out
    assert "held-out N" in text.out and "10,000,000" in text.out
    # losses that do not fall with N: alpha ends on its bound 0, the largest size is missed
    for n in (1e5, 1e6, 1e7):
        for s in (0.0, 0.4, 0.7):
            fake_run(tmp_path / "flat" / f"n{n:g}-s{s}", n, s, 2.0 + 0.3 * s + (0.1 if n == 1e7 else 0))
    flat = cli("scaling", "fit", tmp_path / "flat", "--bootstrap", "0")
    assert flat.code == 0 and "zoo: warning: the fit ended on the edge of its search box (" in flat.err
    assert "alpha = 0" in flat.err and "degenerate" in flat.err
    assert "fitted without the runs at N = 10,000,000" in flat.err
    assert cli("scaling", "fit", tmp_path / "runs", "--bootstrap", "-1").code == 2
    few = cli("scaling", "fit", *sorted((tmp_path / "runs").iterdir())[:3])
    assert few.code == 2 and "needs at least 5 runs, got 3" in few.err


def test_eval_reports_loss_sparsity_and_params(tmp_path, cli):
    r = tiny_run(tmp_path, **{"train.steps": 2, "model.sparsity": {"kind": "topk", "keep": 0.5},
                              "model.ffn.activation": "relu2"})
    summary = train(r, tmp_path / "run", progress=False)
    assert summary["sparsity"]["overall"] >= 0.45
    res = cli("eval", tmp_path / "run", "--json")
    assert res.code == 0, res.err
    rep = json.loads(res.out)
    assert rep["val_loss"] == pytest.approx(summary["val_loss"], rel=1e-5)
    assert set(rep["sparsity"]["by_role"]) == {"qkv", "o", "up_gate", "down"}
    assert rep["sparsity"]["by_role"]["qkv"] == pytest.approx(0.5, abs=0.02)
    assert rep["accounting"]["activated_params"] < rep["accounting"]["non_embedding_params"]
    (tmp_path / "other.txt").write_text("in the beginning was the word and the word was with god.\n" * 40)
    other = cli("eval", tmp_path / "run", "--data", tmp_path / "other.txt", "--json")
    assert other.code == 0, other.err
    assert json.loads(other.out)["val_loss"] != rep["val_loss"]
    text = cli("eval", tmp_path / "run")
    assert "perplexity" in text.out and "measured sparsity" in text.out
    missing = cli("eval", tmp_path / "run", "--data", tmp_path / "nope.txt")
    assert missing.code == 2 and "no such file or folder" in missing.err


def test_quickstart_trains_compares_and_plots(tmp_path, cli):
    dense = tiny_run(tmp_path)
    sparse = dense.replace(**{"name": "sparse", "model.sparsity": {"kind": "topk", "keep": 0.5}})
    (tmp_path / "dense.toml").write_text(dense.to_toml())
    (tmp_path / "sparse.toml").write_text(sparse.to_toml())
    res = cli("quickstart", "--recipes", tmp_path / "dense.toml", tmp_path / "sparse.toml", "--steps", "2",
              "--out", tmp_path / "qs", "--set", "train.eval_batches=1", "--set", "train.seq_len=32", "--quiet")
    assert res.code == 0, res.err
    assert (tmp_path / "qs" / "compare.png").stat().st_size > 10_000
    lines = res.out.strip().splitlines()
    header = next(ln for ln in lines if ln.startswith("run"))
    assert "act.params" in header and "decode ms/tok" in header
    assert any(ln.startswith("dense ") and ln.endswith("model.sparsity.kind=\"none\"") for ln in lines)
    assert any(ln.startswith("sparse ") and ln.endswith("model.sparsity.kind=\"topk\"") for ln in lines)


def test_bench_train_prints_the_ratio_against_transformers(cli):
    res = cli("bench", "train", "--set", "model.d_model=32", "--set", "model.n_layers=1", "--set", "model.n_heads=2",
              "--set", "model.ffn.hidden=64", "--batch", "2", "--seq", "16", "--steps", "1", "--threads", "1", "--json")
    assert res.code == 0, res.err
    out = json.loads(res.out)
    assert out["params_zoo"] == out["params_transformers"] and out["ratio_throughput_zoo_over_transformers"] > 0
    assert out["loss_difference"] < 1e-5 and out["ratio_cpu_time"] > 0 and out["threads"] == 1
    assert out["tokens_per_step"] == 2 * 16 and out["floor_step_s"] > 0


def test_bench_train_refuses_a_recipe_transformers_cannot_express(cli):
    res = cli("bench", "train", "--set", "model.sparsity.kind=topk", "--steps", "1")
    assert res.code == 2 and "model.sparsity.kind" in res.err and "Traceback" not in res.err


def test_bench_moe_reports_best_and_paired_ratios_for_both_weight_kinds(cli):
    res = cli("bench", "moe", "--tokens", "37", "--d-model", "16", "--experts", "3", "--hidden", "24",
              "--repeats", "3", "--threads", "1", "--json")
    assert res.code == 0, res.err
    out = json.loads(res.out)
    assert set(out["weights"]) == {"fp", "bitnet158"} and out["threads"] == 1
    for row, base in zip(out["weights"].values(), ("naive_loop", "per_expert")):
        assert set(row["seconds"]) == {"moe", "dense", base} == set(row["paired_ratio_vs_dense"])
        assert row["ratio_vs_dense"]["dense"] == row["paired_ratio_vs_dense"]["dense"] == 1.0
        assert all(0 < r < float("inf") for r in row["paired_ratio_vs_dense"].values())


def test_generate_uses_the_inference_form_of_bitnet_qsparse(tmp_path, cli):
    r = tiny_run(tmp_path, **{"train.steps": 1, "train.eval_every": 0, "model.weights": {"kind": "bitnet158"},
                              "model.sparsity": {"kind": "topk", "keep": 0.5}})
    train(r, tmp_path / "run", progress=False)
    res = cli("generate", tmp_path / "run", "--prompt", "the", "--max-new-tokens", "5", "--temperature", "0")
    assert res.code == 0, res.err
    assert res.out.startswith("the") and len(res.out.encode()) > len("the\n")
