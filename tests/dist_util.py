"""Launching `zoo train` under torchrun and comparing its run folder with a single-process run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

import zoo
from tests.tiny import tiny_run
from zoo.runs import resolve_checkpoint
from zoo.train.loop import train

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


def torchrun(recipe_file: Path, run: Path, *sets: str, ranks: int = 2) -> subprocess.CompletedProcess:
    """`zoo train recipe_file --out run *sets` on `ranks` gloo processes started by torchrun (one thread each)."""
    launcher = ["-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--standalone", "-m", "zoo"]
    return _run([*launcher, "train", str(recipe_file), "--out", str(run), "--quiet", *sets])


def nproc(recipe_file: Path, run: Path, *sets: str, ranks: int = 2) -> subprocess.CompletedProcess:
    """The same run started by zoo itself: `zoo train ... --nproc-per-node ranks`."""
    return _run(["-m", "zoo", "train", str(recipe_file), "--out", str(run), "--quiet", f"--nproc-per-node={ranks}",
                 *sets])


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *argv], env=env, capture_output=True, text=True, timeout=240)


def single_run(tmp: Path, **overrides) -> tuple[Path, Path]:
    """The recipe file and an in-process (single-process) run of it."""
    recipe_file = tmp / "recipe.toml"
    recipe_file.write_text(tiny_run(tmp, **SETTINGS, **overrides).to_toml())
    train(zoo.load_recipe(recipe_file), tmp / "single", progress=False)
    return recipe_file, tmp / "single"


