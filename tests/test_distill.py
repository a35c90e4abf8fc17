"""`train.distill`: the KL term and its gradient against a float64 reference, and a run that distils."""

from __future__ import annotations

import json

import pytest
import torch

import zoo
from tests.tiny import tiny_run
from zoo.errors import RecipeError
from zoo.train.distill import kl_loss
from zoo.train.loop import train


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_kl_loss_and_gradient_match_float64(temperature):
    g = torch.Generator().manual_seed(0)
    student = torch.randn(3, 5, 37, generator=g, requires_grad=True)
    teacher = torch.randn(3, 5, 37, generator=g) * 2
    loss = kl_loss(student, teacher, temperature)
    loss.backward()
    s, t = student.detach().double() / temperature, teacher.double() / temperature
    p_t, log_p_s = t.softmax(-1), s.log_softmax(-1)
    ref = (p_t * (p_t.log() - log_p_s)).sum(-1).mean() * temperature ** 2
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    grad = temperature * (s.softmax(-1) - p_t) / 15  # d/ds of T² · mean KL, 15 tokens
    torch.testing.assert_close(student.grad.double(), grad, rtol=1e-4, atol=1e-7)
    same = kl_loss(teacher, teacher, temperature)
    assert abs(float(same)) < 1e-6


def test_training_distils_from_a_teacher_checkpoint(tmp_path):
    torch.manual_seed(0)
    teacher = zoo.build(tiny_run(tmp_path))
    zoo.save(teacher, tmp_path / "teacher")
    recipe = tiny_run(tmp_path, train__steps=3, train__init_from=str(tmp_path / "teacher"),
                      train__distill={"teacher": str(tmp_path / "teacher"), "weight": 0.5, "temperature": 2.0},
                      model__sparsity={"kind": "topk", "keep": 0.5})
    train(recipe, tmp_path / "run", progress=False)
    steps = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    kl = [r["aux"]["distill"] for r in steps if r["split"] == "train"]
    assert len(kl) == 3 and all(v > 0 for v in kl)  # top-K makes the student differ from its dense teacher
    recipe = tiny_run(tmp_path, train__steps=1, train__init_from=str(tmp_path / "teacher"),
                      train__distill={"teacher": str(tmp_path / "teacher")})
    train(recipe, tmp_path / "same", progress=False)
    first = json.loads((tmp_path / "same" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["aux"]["distill"] < 1e-6  # a student equal to its teacher: KL 0


def test_distill_needs_a_teacher(tmp_path):
    with pytest.raises(RecipeError, match="train.distill.teacher: required key is missing"):
        tiny_run(tmp_path, train__distill={"weight": 0.5})
