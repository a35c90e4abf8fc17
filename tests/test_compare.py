import json

import pytest

import zoo
from tests.tiny import tiny_run
from zoo.cli import main
from zoo.eval.compare import compare, find_runs, table
from zoo.train.loop import train
from zoo.train.sweep import parse_grid, points, run_name


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two fixture runs differing in the FFN activation, plus a second seed of the first."""
    tmp = tmp_path_factory.mktemp("runs")
    out = tmp / "runs"
    base = {"train.steps": 3, "train.eval_every": 0}
    grads = {"train.layer_grad_norms": True}
    train(tiny_run(tmp, **base, **grads), out / "silu", progress=False)
    train(tiny_run(tmp, **base, **grads, **{"train.seed": 1}), out / "silu-seed1", progress=False)
    train(tiny_run(tmp, **base, **{"model.ffn.activation": "relu"}), out / "relu", progress=False)
    return out


def test_compare_rows_show_only_differing_keys_and_aggregate_seeds(runs):
    rows = compare(find_runs([runs]))
    assert len(rows) == 2
    by = {r["differences"]["model.ffn.activation.kind"]: r for r in rows}
    assert set(by) == {"silu", "relu"} and list(by["silu"]["differences"]) == ["model.ffn.activation.kind"]
    silu, relu = by["silu"], by["relu"]
    assert silu["seeds"] == [0, 1] and relu["seeds"] == [0]
    s0, s1 = (json.loads((runs / n / "summary.json").read_text()) for n in ("silu", "silu-seed1"))
    assert silu["val_loss"] == pytest.approx((s0["val_loss"] + s1["val_loss"]) / 2)
    assert silu["val_loss_std"] == pytest.approx(abs(s0["val_loss"] - s1["val_loss"]) / 2 ** 0.5)
    assert relu["val_loss_std"] is None and relu["total_params"] == s0["accounting"]["total_params"]
    assert silu["settings"] == {"model.ffn.activation.kind": "silu"} and relu["settings"] == {
        "model.ffn.activation.kind": "relu"}
    headers, cells = table(rows)
    row = cells[[r["run"] for r in rows].index(silu["run"])]
    assert headers[:2] == ["run", "seeds"] and "±" in row[headers.index("val")]
    assert row[-1] == 'model.ffn.activation.kind="silu"'


def test_table_prints_settings_as_set_takes_them_and_one_unit_per_column():
    from zoo.eval.compare import COLUMNS

    def row(name, tok_s, settings):
        metrics = {k: 1.0 for _, k, _ in COLUMNS} | {"train_tokens_per_s": tok_s, "sparsity": None}
        return {"run": name, "seeds": [0], "settings": settings, **metrics, **{k + "_std": None for k in metrics}}

    headers, cells = table([row("a", 11812.0, {"model.sparsity.ste": False, "model.sparsity.keep": 0.5}),
                            row("b", 9151.7, {"model.sparsity.ste": True})])
    assert headers[-1] == "differs in"
    rate = headers.index("train tok/s")
    assert [c[rate] for c in cells] == ["11.8k", "9.2k"]
    assert cells[0][-1] == "model.sparsity.ste=false model.sparsity.keep=0.5"
    assert cells[1][-1] == "model.sparsity.ste=true" and cells[1][headers.index("sparsity")] == "-"


def test_cli_compare_json_and_plot(runs, tmp_path, capsys):
    png = tmp_path / "cmp.png"
    assert main(["compare", str(runs / "silu"), str(runs / "relu"), "--json", "--plot", str(png)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["run"] for r in rows] == ["silu", "relu"] and png.stat().st_size > 10_000
    assert main(["compare", str(runs / "silu")]) == 0
    assert "val" in capsys.readouterr().out
    assert main(["compare", str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_layer_gradient_norms_are_averaged_and_plotted(runs, tmp_path, capsys):
    rows = {r["differences"]["model.ffn.activation.kind"]: r for r in compare(find_runs([runs]))}
    per_seed = []
    for name in ("silu", "silu-seed1"):
        logged = [json.loads(line) for line in (runs / name / "metrics.jsonl").read_text().splitlines()]
        norms = [r["layer_grad_norms"] for r in logged if r["split"] == "train"]
        assert len(norms) == 3 and all(len(n) == 2 for n in norms)  # 3 steps, 2 blocks
        per_seed.append([sum(n[i] for n in norms) / 3 for i in range(2)])
    expected = [(a + b) / 2 for a, b in zip(*per_seed)]
    assert rows["silu"]["layer_grad_norms"] == pytest.approx(expected, rel=1e-5)
    assert "layer_grad_norms" not in rows["relu"]
    png = tmp_path / "grads.png"
    assert main(["compare", str(runs), "--grad-plot", str(png)]) == 0
    assert png.stat().st_size > 10_000 and "plot: " in capsys.readouterr().out
    other = tmp_path / "none.png"
    assert main(["compare", str(runs / "relu"), "--grad-plot", str(other), "--plot", str(tmp_path / "l.png")]) == 2
    assert "train.layer_grad_norms = true" in capsys.readouterr().err
    assert not other.exists() and not (tmp_path / "l.png").exists()


def test_unfinished_run_is_named(tmp_path):
    r = tiny_run(tmp_path, **{"train.steps": 4})
    train(r, tmp_path / "half", stop_at=2, progress=False)
    with pytest.raises(zoo.ZooError, match="has not finished"):
        find_runs([tmp_path / "half"])


def test_grid_points_and_names():
    grid = parse_grid(["model.ffn.activation.kind=silu,relu", "optim.lr=1e-3,2e-3"])
    assert grid == {"model.ffn.activation.kind": ["silu", "relu"], "optim.lr": [1e-3, 2e-3]}
    pts = points(grid, [0, 1])
    assert len(pts) == 8 and pts[1] == {"model.ffn.activation.kind": "silu", "optim.lr": 1e-3, "train.seed": 1}
    assert run_name(pts[1]) == "kind-silu_lr-0.001_seed-1"
    with pytest.raises(zoo.ZooError, match="expected key.path=v1,v2"):
        parse_grid(["optim.lr"])


def test_sweep_runs_every_point_and_resumes(tmp_path, capsys):
    r = tiny_run(tmp_path, **{"train.steps": 2, "train.eval_every": 0})
    (tmp_path / "r.toml").write_text(r.to_toml())
    args = ["sweep", str(tmp_path / "r.toml"), "--grid", "model.ffn.activation.kind=silu,relu", "--seeds", "0,1",
            "--out", str(tmp_path / "sw"), "--quiet"]
    assert main(args) == 0
    assert f"4 runs in {tmp_path / 'sw'}" in capsys.readouterr().out
    names = sorted(p.name for p in (tmp_path / "sw").iterdir() if p.is_dir())
    assert names == ["kind-relu_seed-0", "kind-relu_seed-1", "kind-silu_seed-0", "kind-silu_seed-1"]
    before = (tmp_path / "sw" / "kind-relu_seed-1" / "summary.json").read_text()
    capsys.readouterr()
    assert main(args) == 0
    assert capsys.readouterr().err.count("finished before, skipped") == 4
    assert (tmp_path / "sw" / "kind-relu_seed-1" / "summary.json").read_text() == before
    assert main(["sweep", str(tmp_path / "r.toml"), "--out", str(tmp_path / "x")]) == 2
    assert main(["sweep", str(tmp_path / "r.toml"), "--seeds", "0", "--out", str(tmp_path / "one"), "--quiet"]) == 0
    assert f"1 run in {tmp_path / 'one'};" in capsys.readouterr().out
