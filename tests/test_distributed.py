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
from zoo.train.loop import train
from zoo.train.parallel import Parallel, setup
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
