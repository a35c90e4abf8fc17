"""`torchrun -m zoo train` with parallel.strategy = ddp / fsdp on 2 gloo processes equals the single-process run."""

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
from zoo.train.state import resolve_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"train__steps": 4, "train__eval_every": 0, "train__log_every": 1, "train__grad_accum": 2}


def losses(run: Path) -> list[float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r["split"] == "train"]


def torchrun(recipe_file: Path, run: Path, *sets: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
            "-m", "zoo", "train", str(recipe_file), "--out", str(run), "--quiet", *sets]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=240)


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> tuple[Path, Path]:
    """The recipe file and an in-process (single-process) run of it."""
    tmp = tmp_path_factory.mktemp("distributed")
    recipe_file = tmp / "recipe.toml"
    recipe_file.write_text(tiny_run(tmp, **SETTINGS).to_toml())
    train(zoo.load_recipe(recipe_file), tmp / "single", progress=False)
    return recipe_file, tmp / "single"


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_match_one_process(single, tmp_path, strategy):
    recipe_file, ref = single
    proc = torchrun(recipe_file, tmp_path / "run", f"--set=parallel.strategy={strategy}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("val_loss") == 1  # one summary line, from rank 0
    got, want = losses(tmp_path / "run"), losses(ref)
    assert len(got) == len(want) == 4
    assert got == pytest.approx(want, rel=1e-5)
    ckpt = resolve_checkpoint(tmp_path / "run")
    a, b = zoo.load(ckpt).state_dict(), zoo.load(resolve_checkpoint(ref)).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    # the checkpoint holds the optimizer state as one process has it: a DDP run resumes in one process,
    # an FSDP2 run under torchrun again (loading it into the shards); both continue like the single process
    shutil.copytree(ref, tmp_path / "ref")
    train(zoo.load_recipe(ref / "recipe.toml", {"train.steps": 6}), tmp_path / "ref", resume=True, progress=False)
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
