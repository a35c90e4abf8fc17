"""MoE under torchrun: DDP and expert parallelism (experts split over ranks) equal the single-process run."""

from __future__ import annotations

from pathlib import Path

import pytest

import zoo
from tests.dist_util import MOE, assert_same_weights, losses, resumed, single_run, torchrun
from tests.tiny import tiny_run
from zoo.errors import RecipeError
from zoo.train.parallel import Parallel, setup


@pytest.fixture(scope="module")
def moe_single(tmp_path_factory) -> tuple[Path, Path]:
    return single_run(tmp_path_factory.mktemp("distributed-moe"), **MOE)


@pytest.mark.slow
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


@pytest.mark.slow
def test_four_ranks_two_expert_groups(tmp_path):
    """4 ranks, experts split over groups of 2: ranks 0,2 and 1,3 hold the same experts, so their expert
    gradients are summed over those replica groups; losses, gradient norm and weights equal one process."""
    recipe_file, ref = single_run(tmp_path, **MOE, train__batch_size=8)
    proc = torchrun(recipe_file, tmp_path / "run", "--set=parallel.strategy=ddp", "--set=parallel.expert_parallel=2",
                    ranks=4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for key in ("loss", "moe_lb", "grad_norm"):
        assert losses(tmp_path / "run", key) == pytest.approx(losses(ref, key), rel=1e-5), key
    assert_same_weights(tmp_path / "run", ref)
