"""`torchrun -m zoo train` on 2 gloo processes (DDP, FSDP2, MoE expert parallelism) equals the single-process run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import zoo
from tests.tiny import tiny_run
from zoo.errors import RecipeError
from zoo.eval.perplexity import autocast
from zoo.train.loop import train
from zoo.train.parallel import Parallel, resolve_backend, resolve_device, setup
from zoo.train.state import resolve_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"train__steps": 4, "train__eval_every": 0, "train__log_every": 1, "train__grad_accum": 2}


MOE = {"model__ffn": {"kind": "moe", "num_experts": 4, "top_k": 2, "expert": {"kind": "glu", "hidden": 24}}}


def losses(run: Path, key: str = "loss") -> list[float]:
    """Per-step training figures of a run (`key`: loss, grad_norm, or an auxiliary loss such as moe_lb)."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    records = [r for r in map(json.loads, lines) if r["split"] == "train"]
    return [r["aux"][key] if key.startswith("moe_") else r[key] for r in records]


def assert_same_weights(run: Path, ref: Path) -> None:
    """The newest checkpoints of two runs (each loaded in this one process) hold the same tensors."""
    a, b = zoo.load(resolve_checkpoint(run)).state_dict(), zoo.load(resolve_checkpoint(ref)).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def resumed(ref: Path, tmp: Path) -> Path:
    """A copy of single-process run `ref` continued in this process to 6 steps."""
    shutil.copytree(ref, tmp)
    train(zoo.load_recipe(ref / "recipe.toml", {"train.steps": 6}), tmp, resume=True, progress=False)
    return tmp


def torchrun(recipe_file: Path, run: Path, *sets: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
            "-m", "zoo", "train", str(recipe_file), "--out", str(run), "--quiet", *sets]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=240)


def single_run(tmp: Path, **overrides) -> tuple[Path, Path]:
    """The recipe file and an in-process (single-process) run of it."""
    recipe_file = tmp / "recipe.toml"
    recipe_file.write_text(tiny_run(tmp, **SETTINGS, **overrides).to_toml())
    train(zoo.load_recipe(recipe_file), tmp / "single", progress=False)
    return recipe_file, tmp / "single"


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> tuple[Path, Path]:
    return single_run(tmp_path_factory.mktemp("distributed"))


@pytest.fixture(scope="module")
def moe_single(tmp_path_factory) -> tuple[Path, Path]:
    return single_run(tmp_path_factory.mktemp("distributed-moe"), **MOE)


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


@pytest.mark.parametrize("expert_parallel", [1, 2])
def test_moe_two_ranks_match_one_process(moe_single, tmp_path, expert_parallel):
    """MoE under DDP (every rank holds all experts) and with the experts split over the 2 ranks: the same
    losses, load-balancing loss included (its token fractions count both ranks' tokens), and weights."""
    recipe_file, ref = moe_single
    sets = ["--set=parallel.strategy=ddp", f"--set=parallel.expert_parallel={expert_parallel}"]
    proc = torchrun(recipe_file, tmp_path / "run", *sets)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for key in ("loss", "moe_lb", "moe_z", "grad_norm"):  # grad_norm: the expert gradients' scale
        assert losses(tmp_path / "run", key) == pytest.approx(losses(ref, key), rel=1e-5), key
    assert_same_weights(tmp_path / "run", ref)  # the experts were gathered to rank 0: a single-process checkpoint
    if expert_parallel == 2:  # --resume under expert parallelism: each rank takes its experts and their moments
        proc = torchrun(recipe_file, tmp_path / "run", *sets, "--steps=6", "--resume")
        assert proc.returncode == 0, proc.stderr[-3000:]
        want = resumed(ref, tmp_path / "ref")
        assert losses(tmp_path / "run") == pytest.approx(losses(want), rel=1e-5)
        assert len(losses(tmp_path / "run")) == 6
        assert_same_weights(tmp_path / "run", want)


def test_expert_parallel_errors_name_the_key(tmp_path, monkeypatch):
    """Wrong expert_parallel settings fail before any process group or file exists."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    recipe = tiny_run(tmp_path, **MOE, parallel__strategy="ddp", parallel__expert_parallel=2)
    for change, says in [({"parallel.strategy": "fsdp"}, "needs parallel.strategy = 'ddp'"),
                         ({"parallel.expert_parallel": 4}, "must divide the world size 2")]:
        with pytest.raises(RecipeError, match="parallel.expert_parallel") as err:
            setup(recipe.replace(**change))
        assert says in str(err.value)
    par = Parallel("ddp", 0, 2, expert=2, source="r.toml")
    for change, says in [({"model.ffn.num_experts": 3}, "must divide num_experts = 3"),
                         ({"model.ffn": {"kind": "glu"}}, "the model has no MoE layer")]:
        with pytest.raises(RecipeError, match="r.toml:parallel.expert_parallel") as err:
            par.wrap(zoo.build(recipe.replace(**change)))
        assert says in str(err.value)


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
