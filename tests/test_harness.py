"""zoo models through lm-eval: the LM methods against direct computation, and a tiny model on zoo's local tasks
(skipped when lm-eval, the optional `eval` extra, is not installed)."""

from __future__ import annotations

import json

import pytest
import torch

import zoo
from tests.conftest import tiny
from tests.tiny import tiny_run
from zoo.data import ByteTokenizer
from zoo.train.loop import train

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'qsparse-zoo[eval]')")

from lm_eval.api.instance import Instance  # noqa: E402

from zoo.eval.harness import ZooLM  # noqa: E402


def request(kind, *args):
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


@pytest.fixture
def lm():
    torch.manual_seed(0)
    model = zoo.build(tiny()).eval()
    return ZooLM(model, ByteTokenizer(), eot=10, batch_size=3)


def direct(model, ids: list[int], n: int) -> float:
    """log p of the last n of `ids` given the rest, in float64 from one unpadded forward."""
    with torch.no_grad():
        logp = model(torch.tensor([ids[:-1]])).logits.double().log_softmax(-1)[0]
    return float(sum(logp[len(ids) - 1 - n + j, ids[len(ids) - n + j]] for j in range(n)))


def test_loglikelihood_batched_equals_one_unpadded_forward_each(lm):
    pairs = [("In the beginning", " God"), ("And", " the earth was"), ("x", "y"), ("Let there be", " light.")]
    got = lm.loglikelihood([request("loglikelihood", c, t) for c, t in pairs])
    for (context, target), (score, greedy) in zip(pairs, got):
        ids = list((context + target).encode())
        assert score == pytest.approx(direct(lm.model, ids, len(target)), rel=1e-5, abs=1e-5)
        assert isinstance(greedy, bool)


def test_a_continuation_longer_than_the_window_is_scored_in_pieces(lm):
    context, target = "And", " God said, Let there be light: and there was light. And God saw the light, that it was."
    ((score, _),) = lm.loglikelihood([request("loglikelihood", context, target)])
    ids = list((context + target).encode())
    want = 0.0
    for b in range(len(ids), len(ids) - len(target), -64):  # each target from the 64 tokens before it
        a = max(b - 64, len(ids) - len(target))
        window = ids[max(0, b - 65):b]
        want += direct(lm.model, window, b - a)
    assert len(target) > 64 and score == pytest.approx(want, rel=1e-5)


def test_loglikelihood_rolling_scores_every_token_once(lm):
    short = "And God saw the light."
    (score,) = lm.loglikelihood_rolling([request("loglikelihood_rolling", short)])
    assert score == pytest.approx(direct(lm.model, [10, *short.encode()], len(short)), rel=1e-5)
    long = "In the beginning God created the heaven and the earth. " * 3  # longer than max_seq_len = 64
    (total,) = lm.loglikelihood_rolling([request("loglikelihood_rolling", long)])
    seen = []
    lm._loglikelihood_tokens = lambda reqs, **kw: [(seen.extend(c) or 0.0, True) for _, _, c in reqs]
    lm.loglikelihood_rolling([request("loglikelihood_rolling", long)])
    assert seen == list(long.encode()) and total < 0


def test_generate_until_is_greedy_and_stops(lm):
    (text,) = lm.generate_until([request("generate_until", "In the", {"until": ["\n"], "max_gen_toks": 12})])
    steps = [int(t[0, 0]) for t in lm.model.generate(torch.tensor([list(b"In the")]), 12, temperature=0)]
    expected = bytes(steps[:steps.index(10)] if 10 in steps else steps).decode("utf-8", errors="replace")
    assert text == expected.split("\n")[0]


@pytest.mark.slow
def test_zoo_eval_tasks_on_a_run_and_zoo_compare_shows_them(tmp_path, cli):
    train(tiny_run(tmp_path, train__steps=2, train__eval_every=0, model__max_seq_len=64), tmp_path / "run",
          progress=False)
    r = cli("eval", tmp_path / "run", "--tasks", "zoo_kjv_next_verse,zoo_kjv_rolling", "--limit", "2", "--json")
    assert r.code == 0, r.err
    scores = json.loads(r.out)["tasks"]
    assert 0 <= scores["zoo_kjv_next_verse"]["acc"] <= 1 and scores["zoo_kjv_rolling"]["byte_perplexity"] > 1
    assert json.loads((tmp_path / "run" / "tasks.json").read_text()) == scores
    r = cli("compare", tmp_path / "run")
    assert r.code == 0 and "zoo_kjv_next_verse/acc" in r.out
    r = cli("eval", tmp_path / "run", "--tasks", "zoo_kjv_next_vers", "--save", tmp_path / "typo")
    assert r.code == 2 and 'did you mean "zoo_kjv_next_verse"' in r.err and len(r.err.strip().splitlines()) == 1
    assert not (tmp_path / "typo").exists()

    # a training-free variant of the same weights, saved as an evaluation record: one table with the run
    topk = 'model.sparsity={kind="topk", keep=0.5}'
    r = cli("eval", tmp_path / "run", "--set", topk, "--tasks", "zoo_kjv_next_verse", "--limit", "2", "--save",
            tmp_path / "topk", "--batch-size", "3", "--json")
    assert r.code == 0, r.err
    record = json.loads((tmp_path / "topk" / "evaluation.json").read_text())
    assert record["tasks"] == json.loads(r.out)["tasks"] and record["task_limits"] == {"zoo_kjv_next_verse": 2}
    assert record["overrides"] == [topk] and record["decode"]["ms_per_token"] > 0
    assert json.loads((tmp_path / "run" / "tasks.json").read_text()) == scores  # --set: the run is not touched
    r = cli("compare", tmp_path / "run", tmp_path / "topk", "--json")
    rows = {row["run"]: row for row in json.loads(r.out)}
    assert rows["topk"]["tasks"]["zoo_kjv_next_verse/acc"] == record["tasks"]["zoo_kjv_next_verse"]["acc"]
    assert rows["run"]["tasks"]["zoo_kjv_next_verse/acc"] == scores["zoo_kjv_next_verse"]["acc"]
    assert rows["topk"]["activated_params"] < rows["run"]["activated_params"]
    r = cli("compare", tmp_path / "run", tmp_path / "topk")
    header, *lines = r.out.splitlines()
    assert "zoo_kjv_rolling/byte_perplexity" in header and "decode ms/tok" in header
    rolling = header.index("zoo_kjv_rolling/byte_perplexity")
    topk_line = next(ln for ln in lines if ln.startswith("topk"))
    assert topk_line[rolling:].split()[0] == "-"  # the record ran no rolling task: a blank


def test_a_local_task_whose_data_file_is_missing_is_one_line(tmp_path):
    from zoo.errors import ZooError
    from zoo.eval.tasks import task_config

    with pytest.raises(ZooError, match="lm-eval task zoo_kjv_rolling: data file .*nope.jsonl is missing"):
        task_config("zoo_kjv_rolling", tmp_path / "nope.jsonl")
