import json
import sys

import pytest
import torch

import zoo
from tests.conftest import RECIPES, needs_cxx
from tests.tiny import tiny_run
from zoo.cli import main
from zoo.runs import step_dirs
from zoo.train import loop
from zoo.train.loop import TrainingDiverged, train


def records(run, split="train"):
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def test_short_run_writes_metrics_checkpoints_and_summary(tmp_path):
    r = tiny_run(tmp_path, **{"train.layer_grad_norms": True})
    s = train(r, tmp_path / "run", progress=False)
    run = tmp_path / "run"
    tr, va = records(run), records(run, "val")
    assert [x["step"] for x in tr] == list(range(1, 7)) and [x["step"] for x in va] == [3, 6]
    assert all(len(x["layer_grad_norms"]) == 2 and x["lr"] > 0 and x["tokens_per_s"] > 0 for x in tr)
    assert s["val_loss"] == va[-1]["val_loss"] and s["steps"] == 6 and s["tokens"] == 6 * 4 * 32
    assert s["accounting"]["total_params"] == zoo.account(zoo.build(r)).total_params
    assert json.loads((run / "summary.json").read_text()) == s
    assert [p.name for p in step_dirs(run)] == ["step-00000006"]
    assert zoo.load(step_dirs(run)[-1]) is not None


def test_summary_times_decode_on_the_inference_form_zoo_generate_runs(tmp_path, monkeypatch):
    from zoo.blocks.bitnet import TernaryLinear
    from zoo.blocks.weights import TopKLinear

    seen = []
    measured = {"ms_per_token": 8.0, "tokens": 32, "prompt": 8, "threads": 1, "compiled": False}
    monkeypatch.setattr(loop, "decode_ms", lambda model, prompt, compile: seen.append(model) or measured)
    r = tiny_run(tmp_path, **{"train.steps": 2, "model.sparsity": {"kind": "topk", "keep": 0.5}})
    summary = train(r, tmp_path / "qs", progress=False)
    assert summary["decode"] == measured and summary["decode_tokens_per_s"] == 125.0
    assert any(isinstance(m, TopKLinear) for m in seen[-1].modules()) and not seen[-1].training
    r = tiny_run(tmp_path, **{"train.steps": 2, "model.weights": {"kind": "bitnet158"}})
    train(r, tmp_path / "bn", progress=False)
    assert any(isinstance(m, TernaryLinear) for m in seen[-1].modules())


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(tmp_path):
    r = tiny_run(tmp_path, **{"train.ckpt_every": 3, "train.steps": 8})
    train(r, tmp_path / "a", progress=False)
    stopped = train(r, tmp_path / "b", stop_at=4, progress=False)
    assert stopped["step"] == 4 and not (tmp_path / "b" / "summary.json").exists()
    train(r, tmp_path / "b", resume=True, progress=False)
    a, b = records(tmp_path / "a"), records(tmp_path / "b")
    assert [x["step"] for x in b] == list(range(1, 9))
    assert [(x["loss"], x["grad_norm"], x["lr"]) for x in a] == [(x["loss"], x["grad_norm"], x["lr"]) for x in b]
    assert [x["val_loss"] for x in records(tmp_path / "a", "val")] == \
        [x["val_loss"] for x in records(tmp_path / "b", "val")]
    wa = zoo.load(step_dirs(tmp_path / "a")[-1]).state_dict()
    wb = zoo.load(step_dirs(tmp_path / "b")[-1]).state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_grad_accumulation_matches_one_big_batch(tmp_path):
    one = train(tiny_run(tmp_path, **{"train.steps": 1}), tmp_path / "one", progress=False)
    two = train(tiny_run(tmp_path, **{"train.steps": 1, "train.grad_accum": 2}), tmp_path / "two", progress=False)
    a, b = records(tmp_path / "one")[0], records(tmp_path / "two")[0]
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    assert one["val_loss"] == pytest.approx(two["val_loss"], rel=1e-4)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real_build = loop.build

    def poisoned(recipe, **kw):
        model = real_build(recipe, **kw)
        calls = [0]

        def hook(module, inputs, output):
            calls[0] += 1
            # call 1 is the start-up check's forward (first_forward), calls 2-5 are steps 1-4
            return output * float("nan") if calls[0] > 5 and module.training else output
        model.head.register_forward_hook(hook)
        return model

    monkeypatch.setattr(loop, "build", poisoned)
    r = tiny_run(tmp_path, **{"train.ckpt_every": 2, "train.eval_every": 0})
    with pytest.raises(TrainingDiverged, match=r"step 5: loss nan; the last good checkpoint is .*step-00000004"):
        train(r, tmp_path / "run", progress=False)
    assert [p.name for p in step_dirs(tmp_path / "run")] == ["step-00000002", "step-00000004"]


def test_out_dir_errors(tmp_path):
    r = tiny_run(tmp_path, **{"train.steps": 1})
    (tmp_path / "file").write_text("x")
    with pytest.raises(zoo.ZooError, match="cannot write there"):
        train(r, tmp_path / "file" / "run", progress=False)
    train(r, tmp_path / "run", progress=False)
    with pytest.raises(zoo.ZooError, match="already holds a run"):
        train(r, tmp_path / "run", progress=False)
    with pytest.raises(zoo.ZooError, match=r"recipe differs .*train.seed: 0 -> 1"):
        train(r.replace(**{"train.seed": 1}), tmp_path / "run", resume=True, progress=False)
    with pytest.raises(zoo.RecipeError, match=r"train.seq_len: 128 exceeds model.max_seq_len = 64"):
        train(r.replace(**{"train.seq_len": 128}), tmp_path / "long", progress=False)
    with pytest.raises(zoo.CheckpointError, match="no checkpoints"):
        train(r, tmp_path / "fresh", resume=True, progress=False)


def test_a_failed_start_writes_nothing_and_a_retry_succeeds(tmp_path, monkeypatch):
    """What fails at start-up (a missing optional package, a kernel backend the device cannot run, the
    data, the recipe) fails before the run folder is written to: the same --out works once fixed."""
    r = tiny_run(tmp_path, **{"train.steps": 1, "train.eval_every": 0})
    out = tmp_path / "run"
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    with pytest.raises(zoo.ZooError, match="needs the tensorboard package"):
        train(r.replace(**{"train.tensorboard": True}), out, progress=False)
    moe = {"kind": "moe", "num_experts": 2, "top_k": 1, "backend": "triton", "expert": {"kind": "glu", "hidden": 16}}
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the tests run Triton interpreted on the CPU: not here
    with pytest.raises(zoo.ZooError, match="[Tt]riton"):  # no triton package, or triton on a CPU tensor
        train(r.replace(**{"model.ffn": moe}), out, progress=False)
    with pytest.raises(zoo.ZooError, match="no such file"):
        train(r.replace(**{"data.dataset.paths": [str(tmp_path / "missing.txt")]}), out, progress=False)
    assert not out.exists()
    assert train(r, out, progress=False)["steps"] == 1


def test_init_from_continues_training_and_checks_tensors(tmp_path):
    base = train(tiny_run(tmp_path), tmp_path / "base", progress=False)
    r = tiny_run(tmp_path, **{"train.init_from": str(tmp_path / "base"), "train.steps": 2})
    tuned = train(r, tmp_path / "tuned", progress=False)
    first = records(tmp_path / "tuned")[0]["loss"]
    assert first < records(tmp_path / "base")[0]["loss"] and tuned["val_loss"] < base["val_loss"] + 0.5
    wide = tiny_run(tmp_path, **{"train.init_from": str(tmp_path / "base"), "model.d_model": 48})
    with pytest.raises(zoo.CheckpointError, match=r"init_from .*tensor '.*' is \(.*32.*\) there, \(.*48.*\) in this"):
        train(wide, tmp_path / "wide", progress=False)


def test_cli_train_and_its_errors(tmp_path, capsys):
    r = tiny_run(tmp_path)
    (tmp_path / "r.toml").write_text(r.to_toml())
    assert main(["train", str(tmp_path / "r.toml"), "--out", str(tmp_path / "run"), "--steps", "2", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["steps"] == 2
    assert main(["train", str(tmp_path / "missing.toml"), "--out", str(tmp_path / "x")]) == 2
    assert "missing.toml: file not found" in capsys.readouterr().err


def test_moe_aux_losses_are_logged_separately_and_bf16_runs(tmp_path):
    moe = {"kind": "moe", "num_experts": 4, "top_k": 2, "expert": {"kind": "glu", "hidden": 32},
           "aux_loss": 0.01, "z_loss": 0.001}
    r = tiny_run(tmp_path, **{"model.ffn": moe, "train.steps": 2, "train.precision": "bf16", "train.eval_every": 0})
    s = train(r, tmp_path / "run", progress=False)
    aux = records(tmp_path / "run")[0]["aux"]
    assert set(aux) == {"moe_lb", "moe_z"} and all(v > 0 for v in aux.values())
    assert s["val_loss"] > 0


def test_tensorboard_without_the_package_is_a_clear_error(tmp_path):
    try:
        import tensorboard  # noqa: F401
        pytest.skip("tensorboard is installed here")
    except ImportError:
        pass
    with pytest.raises(zoo.ZooError, match="needs the tensorboard package"):
        train(tiny_run(tmp_path, **{"train.tensorboard": True}), tmp_path / "run", progress=False)


@pytest.mark.slow  # torch.compile
@needs_cxx
def test_compile_true_trains_through_torch_compile_with_the_eager_losses(tmp_path):
    """A MoE model: the dispatch (data-dependent shapes) stays eager inside the compiled model, the rest
    compiles, and the steps give the eager losses and gradient norms."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    graphs = counters["stats"]["unique_graphs"]
    moe = {"kind": "moe", "num_experts": 4, "top_k": 2, "expert": {"kind": "glu", "hidden": 24}}
    overrides = {"train.steps": 3, "train.eval_every": 0, "model.ffn": moe}
    train(tiny_run(tmp_path, **overrides, **{"train.compile": True}), tmp_path / "compiled", progress=False)
    assert counters["stats"]["unique_graphs"] > graphs  # the steps really ran a compiled graph
    train(tiny_run(tmp_path, **overrides), tmp_path / "eager", progress=False)
    compiled, eager = records(tmp_path / "compiled"), records(tmp_path / "eager")
    assert [x["loss"] for x in compiled] == pytest.approx([x["loss"] for x in eager], rel=1e-4)
    assert [x["grad_norm"] for x in compiled] == pytest.approx([x["grad_norm"] for x in eager], rel=1e-3)
    torch._dynamo.reset()


def test_adamw_decays_matrices_only_stacked_expert_vectors_count_as_vectors():
    recipe = zoo.load_recipe(RECIPES / "tiny/moe.toml", {"model.ffn.expert.bias": True, "model.n_layers": 1})
    model = zoo.build(recipe)
    opt = zoo.registry.get_registry().get("optimizer", "adamw").factory(recipe.optim.config, model.parameters())
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in model.named_parameters():
        matrix = p.dim() - getattr(p, "expert_dims", 0) >= 2
        assert (id(p) in decayed) == matrix, name
    stacked_bias = [n for n, p in model.named_parameters() if getattr(p, "expert_dims", 0) and p.dim() == 2]
    assert stacked_bias and all(id(dict(model.named_parameters())[n]) not in decayed for n in stacked_bias)


def test_adamw_is_fused_on_cpu_and_steps_like_the_per_tensor_loop(tiny_model):
    """zoo's AdamW uses torch's fused kernel where it can; its updates equal the plain per-tensor AdamW's."""
    cfg = zoo.load_recipe(RECIPES / "tiny/dense.toml").optim.config
    twin = [p.detach().clone().requires_grad_() for p in tiny_model.parameters()]
    opt = zoo.registry.get_registry().get("optimizer", "adamw").factory(cfg, tiny_model.parameters())
    assert all(g["fused"] for g in opt.param_groups)
    ref = torch.optim.AdamW([{"params": [t for p, t in zip(tiny_model.parameters(), twin) if p.dim() >= 2],
                              "weight_decay": cfg.weight_decay},
                             {"params": [t for p, t in zip(tiny_model.parameters(), twin) if p.dim() < 2],
                              "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, foreach=False)
    torch.manual_seed(0)
    for _ in range(3):
        for p, t in zip(tiny_model.parameters(), twin):
            p.grad = torch.randn_like(p)
            t.grad = p.grad.clone()
        opt.step()
        ref.step()
    for p, t in zip(tiny_model.parameters(), twin):
        torch.testing.assert_close(p, t, rtol=1e-6, atol=1e-7)
    from zoo.train.optim import fusable

    assert not fusable([torch.zeros(2, dtype=torch.int64)]) and not fusable([])
