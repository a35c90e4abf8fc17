"""`torchrun -m zoo train` on 2 gloo processes (DDP, FSDP2) equals the single-process run; device and backend."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import zoo
from tests.dist_util import MOE, assert_same_weights, losses, resumed, single_run, torchrun
from tests.tiny import tiny_run
from zoo.errors import RecipeError
from zoo.eval.perplexity import autocast
from zoo.train.loop import train
from zoo.train.parallel import resolve_backend, resolve_device, setup


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> tuple[Path, Path]:
    return single_run(tmp_path_factory.mktemp("distributed"))


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_match_one_process(single, tmp_path, strategy):
    recipe_file, ref = single
    proc = torchrun(recipe_file, tmp_path / "run", f"--set=parallel.strategy={strategy}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("val_loss") == 1  # one summary line, from rank 0
    got, want = losses(tmp_path / "run"), losses(ref)
    assert len(got) == len(want) == 4
    assert got == pytest.approx(want, rel=1e-5)
    assert_same_weights(tmp_path / "run", ref)
    # the checkpoint holds the optimizer state as one process has it: a DDP run resumes in one process,
    # an FSDP2 run under torchrun again (loading it into the shards); both continue like the single process
    resumed(ref, tmp_path / "ref")
    if strategy == "ddp":
        train(zoo.load_recipe(tmp_path / "run/recipe.toml", {"train.steps": 6}), tmp_path / "run", resume=True,
              progress=False)
    else:
        proc = torchrun(recipe_file, tmp_path / "run", f"--set=parallel.strategy={strategy}", "--steps=6", "--resume")
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert losses(tmp_path / "run") == pytest.approx(losses(tmp_path / "ref"), rel=1e-5)
    assert len(losses(tmp_path / "run")) == 6


def test_global_batch_must_divide_over_ranks(single, tmp_path):
    recipe_file, _ = single
    proc = torchrun(recipe_file, tmp_path / "run", "--set=parallel.strategy=ddp", "--set=train.batch_size=6")
    assert proc.returncode != 0
    assert "train.batch_size" in proc.stderr and "divisible" in proc.stderr
    assert "zoo: error:" in proc.stderr  # each rank exits 2 with one line (torchrun then reports the failure)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_without_torchrun_any_strategy_is_the_single_process_path(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    recipe = tiny_run(tmp_path, train__steps=2, train__eval_every=0, parallel__strategy="fsdp")
    assert train(recipe, tmp_path / "run", progress=False)["steps"] == 2
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RecipeError, match="parallel.strategy"):
        train(recipe.replace(**{"parallel.strategy": "none"}), tmp_path / "other", progress=False)


def test_device_and_backend_resolution(monkeypatch):
    """train.device auto = CUDA when available (the LOCAL_RANK-th GPU), else CPU; backend auto follows it."""
    cpu, cuda1 = torch.device("cpu"), torch.device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto", 0) == resolve_device("cpu", 0) == cpu
    with pytest.raises(RecipeError, match=r"r.toml:train.device: 'cuda', but torch sees no CUDA.*'cpu' or 'auto'"):
        resolve_device("cuda", 0, "r.toml")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a node with 2 GPUs
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto", 1) == resolve_device("cuda", 1) == cuda1
    assert resolve_device("cpu", 1) == cpu
    with pytest.raises(RecipeError, match="train.device: LOCAL_RANK=2 but this node has 2 CUDA device"):
        resolve_device("auto", 2)
    assert resolve_backend("auto", cpu) == "gloo"
    assert resolve_backend("auto", cuda1) == "nccl"
    assert resolve_backend("gloo", cuda1) == "gloo"
    with pytest.raises(RecipeError, match=r"parallel.backend: nccl needs CUDA tensors.*use backend 'gloo' or 'auto'"):
        resolve_backend("nccl", cpu)


def test_bf16_autocast_follows_the_device():
    with autocast("bf16", torch.device("cpu")):
        assert torch.is_autocast_enabled("cpu") and not torch.is_autocast_enabled("cuda")
    with autocast("fp32", "cpu"):
        assert not torch.is_autocast_enabled("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the errors of a machine without CUDA")
def test_cuda_and_nccl_without_cuda_are_recipe_errors(tmp_path, monkeypatch, cli):
    recipe = tiny_run(tmp_path, train__steps=1)
    with pytest.raises(RecipeError, match="train.device"):
        train(recipe.replace(**{"train.device": "cuda"}), tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "recipe.toml").exists()
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RecipeError, match="parallel.backend: nccl needs CUDA tensors, and train.device is cpu"):
        setup(recipe.replace(**{"parallel.strategy": "ddp", "parallel.backend": "nccl"}))
    monkeypatch.delenv("WORLD_SIZE")
    (tmp_path / "r.toml").write_text(recipe.to_toml())
    res = cli("train", tmp_path / "r.toml", "--out", tmp_path / "cli", "--set", "train.device=cuda")
    assert res.code == 2 and res.err.count("\n") == 1 and "train.device" in res.err


@pytest.mark.gpu
def test_trains_on_cuda(tmp_path):
    """2 steps of the tiny MoE on the GPU: the model and batches are on CUDA, the losses equal the CPU run
    (fp32), and bf16 autocast runs on CUDA."""
    recipe = tiny_run(tmp_path, **MOE, train__steps=2, train__eval_every=0, train__log_every=1)
    train(recipe.replace(**{"train.device": "cpu"}), tmp_path / "cpu", progress=False)
    torch.cuda.reset_peak_memory_stats()
    train(recipe.replace(**{"train.device": "cuda"}), tmp_path / "cuda", progress=False)
    assert torch.cuda.max_memory_allocated() > 0
    assert losses(tmp_path / "cuda") == pytest.approx(losses(tmp_path / "cpu"), rel=1e-3)
    train(recipe.replace(**{"train.device": "cuda", "train.precision": "bf16"}), tmp_path / "bf16", progress=False)
    assert losses(tmp_path / "bf16") == pytest.approx(losses(tmp_path / "cpu"), rel=5e-2)
    assert_same_weights(tmp_path / "cuda", tmp_path / "cpu")
