"""Faults during training: SIGKILL at any moment (also inside a checkpoint write), a full disk, an unwritable
folder. Nothing is lost: `--resume` finishes the run with weights bit-identical to an uninterrupted run.

To kill a process exactly while a checkpoint's temporary folder is complete but not yet renamed into
place, the training process is started through PAUSING (`python -c`): it wraps os.replace and os.rename
so that renaming a `.tmp-` folder waits first. zoo itself has no test hook.
"""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import zoo
import zoo.io.checkpoint as checkpoint
from tests.conftest import ROOT
from tests.tiny import tiny_run
from zoo.runs import CHECKPOINTS, resolve_checkpoint, step_dirs
from zoo.train.loop import train

STEPS = 8
SETTINGS = {"train__steps": STEPS, "train__ckpt_every": 2, "train__keep_last": 2, "train__eval_every": 0}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}  # one thread, as in-process: same sums


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[zoo.Recipe, dict[str, torch.Tensor]]:
    """The recipe and the final weights of an uninterrupted in-process run."""
    tmp = tmp_path_factory.mktemp("reference")
    recipe = tiny_run(tmp, **SETTINGS)
    train(recipe, tmp / "run", progress=False)
    return recipe, final_weights(tmp / "run")


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    ckpt = resolve_checkpoint(run)
    assert ckpt.name == f"step-{STEPS:08d}"
    return zoo.load(ckpt).state_dict()


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"


def assert_resumable(run: Path) -> None:
    """The newest checkpoint (if any) loads; no half-written folder looks like a checkpoint."""
    for ckpt in step_dirs(run):
        zoo.load(ckpt)


# `zoo` with every rename of a complete temporary checkpoint folder delayed by sys.argv[1] seconds
PAUSING = """
import os, sys, time
from zoo.cli import main
pause = float(sys.argv.pop(1))
def delayed(rename):
    def wrapper(src, dst, *args, **kwargs):
        if ".tmp-" in os.path.basename(os.fspath(src)) and os.path.isdir(src):
            time.sleep(pause)
        return rename(src, dst, *args, **kwargs)
    return wrapper
os.replace, os.rename = delayed(os.replace), delayed(os.rename)
sys.exit(main(sys.argv[1:]))
"""


def start(recipe_file: Path, run: Path, resume: bool, pause: float) -> subprocess.Popen:
    argv = [sys.executable, "-c", PAUSING, str(pause), "train", str(recipe_file), "--out", str(run), "--quiet"]
    return subprocess.Popen(argv + (["--resume"] if resume else []), env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(proc: subprocess.Popen, condition, timeout: float = 120) -> bool:
    """Poll until `condition()` (True) or the process ends (False)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.01)
    raise AssertionError("timed out waiting for the training process")


def writing(run: Path) -> bool:
    folder = run / CHECKPOINTS
    return folder.is_dir() and any(p.name.startswith(".") and ".tmp-" in p.name for p in folder.iterdir())


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.slow  # trains in subprocesses and kills them
def test_sigkill_anywhere_then_resume_is_bit_identical(reference, tmp_path):
    recipe, expected = reference
    recipe_file = tmp_path / "recipe.toml"
    recipe_file.write_text(recipe.to_toml())
    run = tmp_path / "run"
    rng = random.Random(0)
    # (kill inside a checkpoint write?, delay after start) for each interrupted attempt
    plan = [("write", 0), ("random", rng.uniform(0.5, 2.0)), ("write", 0), ("random", rng.uniform(0.0, 1.0))]
    killed = 0
    for i, (where, delay) in enumerate(plan):
        proc = start(recipe_file, run, resume=i > 0, pause=0.5 if where == "write" else 0)
        if where == "write":
            alive = wait_for(proc, lambda: writing(run))
        else:
            alive = wait_for(proc, lambda: (run / "metrics.jsonl").exists()) and (time.sleep(delay) or True)
        if alive and proc.poll() is None:
            kill(proc)
            killed += 1
        else:
            proc.wait()
        assert_resumable(run)
    assert killed >= 3, "the kill schedule did not interrupt the run"
    proc = start(recipe_file, run, resume=True, pause=0)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert_same(final_weights(run), expected)
    leftovers = [p.name for p in (run / CHECKPOINTS).iterdir() if p.name.startswith(".")]
    assert not leftovers, f"temporary folders left behind: {leftovers}"
    assert len(step_dirs(run)) == 2  # keep_last


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
@pytest.mark.parametrize("at", ["weights", "folder"])
def test_write_failure_keeps_the_previous_checkpoint(reference, tmp_path, monkeypatch, code, at):
    """The 2nd checkpoint fails (disk full, read-only, no permission): a clear error, the 1st intact, and
    --resume ends bit-identical."""
    recipe, expected = reference
    run = tmp_path / "run"
    calls = {"n": 0}
    real_save_file, real_mkdir = checkpoint.save_file, Path.mkdir

    def failing_save_file(tensors, filename, *args, **kwargs):
        calls["n"] += 1
        if at == "weights" and calls["n"] == 2:
            Path(filename).write_bytes(b"partial")  # a disk fills up mid-file
            raise OSError(code, os.strerror(code))
        return real_save_file(tensors, filename, *args, **kwargs)

    def failing_mkdir(self, *args, **kwargs):
        if at == "folder" and ".tmp-" in self.name and calls["n"] >= 1:
            raise OSError(code, os.strerror(code), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", failing_save_file)
    monkeypatch.setattr(Path, "mkdir", failing_mkdir)
    with pytest.raises(zoo.CheckpointError) as info:
        train(recipe, run, progress=False)
    assert os.strerror(code) in str(info.value) and "\n" not in str(info.value)
    monkeypatch.undo()
    (first,) = step_dirs(run)
    assert first.name == "step-00000002"
    zoo.load(first)
    assert not [p.name for p in (run / CHECKPOINTS).iterdir() if p.name.startswith(".")]
    train(recipe, run, resume=True, progress=False)
    assert_same(final_weights(run), expected)
