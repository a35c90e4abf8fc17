"""`torchrun -m zoo train` on 2 gloo processes (DDP, FSDP2) equals the single-process run; `zoo train
--nproc-per-node` equals torchrun; device and backend."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import zoo
from tests.dist_util import MOE, assert_same_weights, losses, nproc, resumed, single_run, torchrun
from tests.tiny import tiny_run
from zoo.errors import RecipeError
from zoo.eval.perplexity import autocast
from zoo.train.launch import report_failure
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
    # each rank exits 2, rank 0 alone prints its line; torchrun then reports the failure (quoting the line)
    assert error_lines(proc) == [next(line for line in proc.stderr.splitlines() if "train.batch_size" in line)]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def error_lines(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("zoo: error:")]


@pytest.mark.slow
def test_zoo_launcher_writes_the_torchrun_run(single, tmp_path):
    """`zoo train --nproc-per-node 2` writes the run folder that torchrun's launch writes."""
    recipe_file, ref = single
    zoo_run, torch_run = tmp_path / "zoo", tmp_path / "torchrun"
    proc = nproc(recipe_file, zoo_run, "--set=parallel.strategy=ddp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("val_loss") == 1 and proc.stderr == ""  # rank 0's summary line, nothing else
    assert torchrun(recipe_file, torch_run, "--set=parallel.strategy=ddp").returncode == 0

    def files(run: Path) -> list[str]:
        return sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    assert files(zoo_run) == files(torch_run)
    assert (zoo_run / "recipe.toml").read_text() == (torch_run / "recipe.toml").read_text()
    assert losses(zoo_run) == losses(torch_run) == pytest.approx(losses(ref), rel=1e-5)
    assert losses(zoo_run, "grad_norm") == losses(torch_run, "grad_norm")
    assert_same_weights(zoo_run, torch_run)


@pytest.mark.slow
def test_zoo_launcher_reports_a_mistake_in_one_line(single, tmp_path):
    recipe_file, _ = single
    # found before any rank starts: the recipe on 2 ranks
    proc = nproc(recipe_file, tmp_path / "run", "--set=parallel.strategy=ddp", "--set=train.batch_size=6")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == error_lines(proc) and len(error_lines(proc)) == 1
    assert "train.batch_size" in proc.stderr and "divisible" in proc.stderr
    # found by the ranks (the corpus is read there): every rank fails, the launcher prints one line
    proc = nproc(recipe_file, tmp_path / "run", "--set=parallel.strategy=ddp", "--set=data.dataset.kind=files",
                 f"--set=data.dataset.paths=['{tmp_path / 'missing.txt'}']")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == error_lines(proc) and len(error_lines(proc)) == 1
    assert "data.dataset.paths[0]" in proc.stderr and "missing.txt" in proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("sets, says", [
    (["--set=train.batch_size=6", "--set=parallel.strategy=ddp"], "train.batch_size"),
    ([], "parallel.strategy is 'none'"),
    (["--set=model.n_layer=3"], "n_layer"),
    (["--set=parallel.strategy=fsdp", "--set=parallel.expert_parallel=2"], "parallel.expert_parallel"),
    (["--set=parallel.strategy=ddp", "--set=train.seq_len=999"], "train.seq_len"),
    (["--set=parallel.strategy=ddp", "--nproc-per-node=0"], "--nproc-per-node 0"),
])
def test_zoo_launcher_checks_before_starting_ranks(single, tmp_path, cli, monkeypatch, sets, says):
    import zoo.train.launch

    recipe_file, _ = single
    monkeypatch.setattr(zoo.train.launch, "launch", lambda *a: pytest.fail("started the ranks"))
    res = cli("train", recipe_file, "--out", tmp_path / "run", "--nproc-per-node=2", *sets)
    assert res.code == 2 and res.err.count("\n") == 1 and says in res.err, res.err
    assert not (tmp_path / "run").exists()


def test_zoo_launcher_checks_the_run_folder_and_the_environment(single, cli, monkeypatch):
    import zoo.train.launch

    recipe_file, ref = single
    monkeypatch.setattr(zoo.train.launch, "launch", lambda *a: pytest.fail("started the ranks"))
    res = cli("train", recipe_file, "--out", ref, "--nproc-per-node=2", "--set=parallel.strategy=ddp")
    assert res.code == 2 and res.err.count("\n") == 1 and "already holds a run" in res.err
    res = cli("train", recipe_file, "--out", ref.parent / "other", "--nproc-per-node=2", "--resume",
              "--set=parallel.strategy=ddp")
    assert res.code == 2 and res.err.count("\n") == 1 and "has no checkpoints" in res.err
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    res = cli("train", recipe_file, "--out", ref.parent / "other", "--nproc-per-node=2")
    assert res.code == 2 and res.err.count("\n") == 1 and "torchrun?" in res.err


def test_launcher_reports_the_root_cause(tmp_path, capsys):
    """A user error (exit 2) is the cause, the earliest one if several; else the first failure; a rank
    that left no record is named with its signal."""
    import json
    import signal
    from types import SimpleNamespace

    def record(rank: int, code: int, when: float, text: str) -> None:
        (tmp_path / f"id/attempt_0/{rank}").mkdir(parents=True)
        (tmp_path / f"id/attempt_0/{rank}/error.json").write_text(json.dumps(
            {"message": {"message": text}, "zoo": {"text": text, "exitcode": code, "time": when}}))

    record(0, 1, 10.0, "Traceback ...\nzoo: internal error (connection closed by peer)")
    record(1, 2, 11.0, "zoo: error: r.toml:data.dataset.paths[0]: no such file")
    record(2, 2, 12.0, "zoo: error: r.toml:train.device: LOCAL_RANK=2 but ...")
    assert report_failure(tmp_path, {}) == 2
    assert capsys.readouterr().err == "zoo: error: r.toml:data.dataset.paths[0]: no such file\n"
    for rank in (1, 2):
        (tmp_path / f"id/attempt_0/{rank}/error.json").unlink()
    assert report_failure(tmp_path, {}) == 1
    assert capsys.readouterr().err.startswith("Traceback ...\nzoo: internal error")
    (tmp_path / "id/attempt_0/0/error.json").unlink()
    killed = SimpleNamespace(exitcode=-signal.SIGKILL, signal_name=lambda: "SIGKILL")
    assert report_failure(tmp_path, {1: killed}) == 128 + signal.SIGKILL
    assert capsys.readouterr().err == "zoo: error: rank 1 was killed by SIGKILL\n"


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
