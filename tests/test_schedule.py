import math

import pytest

import zoo
from zoo.train import schedule as S


def values(kind, steps, **cfg):
    registry = zoo.get_registry()
    entry = registry.get("schedule", kind)
    f = entry.factory(entry.config(**cfg), steps)
    return [f(i) for i in range(steps)]


def test_cosine_warmup_then_decay_to_min():
    v = values("cosine", 100, warmup_steps=4, min_lr_ratio=0.1)
    lr = [a for a, _ in v]
    assert lr[:4] == pytest.approx([1 / 5, 2 / 5, 3 / 5, 4 / 5])
    assert lr[4] == pytest.approx(1.0)
    assert lr[-1] == pytest.approx(0.1)
    mid = 4 + (99 - 4) / 2
    assert lr[round(mid)] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (round(mid) - 4) / 95)))
    assert all(a >= b for a, b in zip(lr[4:], lr[5:]))
    assert all(w == 1.0 for _, w in v)


def test_warmup_is_capped_at_a_tenth_of_the_run():
    lr = [a for a, _ in values("cosine", 20, warmup_steps=50)]
    assert lr[0] == pytest.approx(1 / 3) and lr[2] == pytest.approx(1.0)


def test_wsd_stable_then_linear_decay():
    lr = [a for a, _ in values("wsd", 50, warmup_steps=0, min_lr_ratio=0.0, decay_fraction=0.2)]
    assert lr[:40] == [1.0] * 40
    assert lr[40:] == pytest.approx([1 - (i + 1) / 10 for i in range(10)])


def test_bitnet_two_stages_of_lr_and_weight_decay():
    v = values("bitnet", 40, warmup_steps=0, min_lr_ratio=0.1, stage2_lr_ratio=0.5)
    assert v[:20] == [(1.0, 1.0)] * 20
    assert v[20] == pytest.approx((0.5, 0.0))
    assert v[-1][0] == pytest.approx(0.1)
    assert all(w == 0.0 for _, w in v[20:])


def test_constant():
    assert [a for a, _ in values("constant", 10)] == [1.0] * 10


def test_cosine_from_bounds():
    assert S.cosine_from(0.2, 0) == 1 and S.cosine_from(0.2, 1) == pytest.approx(0.2)
