"""The memory estimate (zoo.model.memory) against what training allocates, and the refusal of a model
that cannot fit: one line, exit 2, no run folder."""

import json

import pytest
import torch

import zoo
from tests.conftest import RECIPES
from tests.tiny import tiny_run
from zoo.eval.perplexity import autocast
from zoo.model import memory
from zoo.model.memory import OutOfMemory, estimate

BIG = ["--set", "model.d_model=65536", "--set", "model.n_heads=8"]  # ~69B parameters


def saved_bytes(model, x, precision: str) -> int:
    """Bytes of the tensors autograd keeps for backward (each storage once, parameters left out)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            kept[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(precision, "cpu"):
        loss = model(x, x).total_loss
    loss.backward()  # as the training loop: backward outside autocast
    return sum(kept.values())


@pytest.mark.parametrize("name", ["dense", "moe", "bitnet-qsparse"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_estimate_within_25_percent_of_measured(name, precision):
    recipe = zoo.load_recipe(RECIPES / f"tiny/{name}.toml", {"model.n_layers": 2})
    torch.manual_seed(0)
    model = zoo.build(recipe)
    batch, seq = 3, 40  # odd sizes
    x = torch.randint(0, recipe.model.vocab_size, (batch, seq))
    measured_act = saved_bytes(model, x, precision)
    opt = zoo.registry.get_registry().get("optimizer", "adamw").factory(recipe.optim.config, model.parameters())
    opt.step()
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    states = sum(t.numel() * t.element_size() for s in opt.state.values() for k, t in s.items() if k != "step")
    est = estimate(zoo.build(recipe, device="meta"), batch, seq, precision)
    assert (est.weights, est.gradients, est.optimizer_states) == (held, grads, states)
    act = est.activations + est.weight_copies
    assert 0.75 < act / measured_act < 1.25, (act, measured_act)
    assert 0.75 < est.train / (held + grads + states + measured_act) < 1.25


def test_fsdp_divides_weights_gradients_and_states_not_activations():
    model = zoo.build(zoo.load_recipe(RECIPES / "tiny/dense.toml"), device="meta")
    one, four = estimate(model, 8, 64), estimate(model, 8, 64, ranks=4, sharded=True)
    assert four.sharded * 4 == pytest.approx(one.sharded, abs=12)
    assert four.activations == one.activations


def test_build_json_reports_memory(cli):
    r = cli("build", RECIPES / "tiny/moe.toml", "--json")
    m = json.loads(r.out)["memory"]
    assert m["train"] == m["weights"] + m["gradients"] + m["optimizer_states"] + m["weight_copies"] + \
        m["activations"]
    assert m["inference"] == m["inference_weights"] + m["kv_cache"] + m["inference_activations"]
    assert m["micro_batch"] == 32 and m["seq_len"] == 128 and m["optimizer_states"] == 2 * m["gradients"]
    r = cli("build", RECIPES / "tiny/moe.toml")
    assert "optimizer_states" in r.out and "MiB" in r.out


def test_train_refuses_a_model_that_cannot_fit(cli, tmp_path):
    out = tmp_path / "run"
    r = cli("train", RECIPES / "tiny/dense.toml", *BIG, "--out", out)
    assert r.code == 2 and r.err.count("\n") == 1 and "Traceback" not in r.err
    assert "training needs an estimated" in r.err and "GiB" in r.err and "available" in r.err
    assert not out.exists()


def test_train_names_fsdp_when_sharding_would_fit(cli, tmp_path, monkeypatch):
    model = zoo.build(zoo.load_recipe(RECIPES / "tiny/dense.toml"), device="meta")
    est = estimate(model, 32, 128)
    # room for the activations and a third of the weights, gradients and states
    monkeypatch.setattr(memory, "available", lambda device: est.activations + est.sharded // 3 + 1)
    r = cli("train", RECIPES / "tiny/dense.toml", "--out", tmp_path / "run")
    assert r.code == 2 and '[parallel] strategy = "fsdp" over 3 ranks' in r.err
    assert not (tmp_path / "run").exists()


def test_build_refuses_weights_that_cannot_fit(tmp_path):
    recipe = zoo.load_recipe(RECIPES / "tiny/dense.toml", {"model.d_model": 65536, "model.n_heads": 8})
    with pytest.raises(OutOfMemory, match="weights need .* GiB but this machine has"):
        zoo.build(recipe)


@pytest.mark.parametrize("err", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: "
                 "you tried to allocate 274877906944 bytes."),
])
def test_allocator_failure_is_one_line(cli, tmp_path, monkeypatch, err):
    import zoo.model.build as build_module

    real = build_module._assemble

    def fail(recipe, device, registry):  # sizing on the meta device works; allocating fails
        if torch.device(device).type == "meta":
            return real(recipe, device, registry)
        raise err

    monkeypatch.setattr(build_module, "_assemble", fail)
    recipe = tiny_run(tmp_path)
    with pytest.raises(OutOfMemory, match="building the model: out of memory"):
        zoo.build(recipe)
    recipe_file = tmp_path / "r.toml"
    recipe_file.write_text(recipe.to_toml())
    r = cli("train", recipe_file, "--out", tmp_path / "run")
    assert r.code == 2 and r.err.count("\n") == 1 and "out of memory" in r.err and "Traceback" not in r.err


def test_other_runtime_errors_stay_errors(monkeypatch):
    def fail(*args):
        raise RuntimeError("shape bug")

    monkeypatch.setattr("zoo.model.build._assemble", fail)
    with pytest.raises(RuntimeError, match="shape bug"):
        zoo.build(zoo.load_recipe(RECIPES / "tiny/dense.toml"), device="meta")
