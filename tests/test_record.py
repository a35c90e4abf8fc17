"""Evaluation records (`zoo eval ... --save DIR`) and `zoo compare` over records and runs together."""

from __future__ import annotations

import json
from datetime import datetime

import pytest
import torch

import zoo
from tests.conftest import tiny
from tests.tiny import tiny_run
from zoo.eval.compare import find_runs
from zoo.eval.perplexity import decode_ms
from zoo.train.loop import train

TOPK = 'model.sparsity={kind="topk", keep=0.5}'
ACT = 'model.ffn.act_sparsity={kind="topk", keep=0.5}'


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("record")
    train(tiny_run(tmp, train__steps=2, train__eval_every=0), tmp / "run", progress=False)
    return tmp / "run"


@pytest.fixture(autouse=True)
def eager(monkeypatch):
    monkeypatch.setenv("ZOO_COMPILE", "0")  # the decode step eager: the tests time nothing, compiling is seconds


def test_decode_ms_times_the_steps_after_the_prompt_on_the_decode_engine(monkeypatch):
    from zoo.model import decode

    steps = []
    step = decode.Decoder.step
    monkeypatch.setattr(decode.Decoder, "step", lambda self, ids: steps.append(self.pos) or step(self, ids))
    model = zoo.build(tiny()).eval()
    prompt = torch.arange(5)[None]
    d = decode_ms(model, prompt, tokens=7, compile=False)
    assert d["tokens"] == 7 and d["prompt"] == 5 and d["threads"] == torch.get_num_threads()
    assert d["compiled"] is False and d["ms_per_token"] > 0
    assert steps == [5, 6] + list(range(5, 12))  # warm-up: 2 steps; then the prompt again and 7 timed steps
    assert decode_ms(model, torch.arange(60)[None], tokens=32, compile=False)["tokens"] == 3  # max_seq_len 64


def test_save_writes_a_record_that_compare_lists_beside_the_run(run, tmp_path, cli):
    r = cli("eval", run, "--set", TOPK, "--set", ACT, "--heldout", "--batches", "1", "--save", tmp_path / "topk",
            "--json")
    assert r.code == 0, r.err
    printed = json.loads(r.out)
    rec = json.loads((tmp_path / "topk" / "evaluation.json").read_text())
    assert rec["model"] == str(run) and rec["overrides"] == [TOPK, ACT] and rec["format"] == 1
    assert rec["checkpoint"].endswith("step-00000002") and len(rec["sha256"]) == 64
    assert rec["recipe"]["model"]["sparsity"]["kind"] == "topk"
    assert rec["val_loss"] == printed["val_loss"] and rec["heldout"] == printed["heldout"]
    assert rec["decode"] == printed["decode"] and rec["decode"]["threads"] == torch.get_num_threads()
    assert rec["decode"]["ms_per_token"] > 0 and rec["decode"]["compiled"] is False
    assert datetime.fromisoformat(rec["decode"]["date"]) <= datetime.fromisoformat(rec["date"])  # decode comes last
    summary = json.loads((run / "summary.json").read_text())
    assert rec["accounting"]["activated_params"] < summary["accounting"]["activated_params"]
    assert [p.name for p in tmp_path.iterdir()] == ["topk"]  # nothing else: no temporary sibling left

    r = cli("compare", run, tmp_path / "topk", "--json")
    assert r.code == 0, r.err
    rows = {row["run"]: row for row in json.loads(r.out)}
    assert set(rows) == {"run", "topk"} and rows["topk"]["record"] and rows["topk"]["seeds"] == []
    assert rows["topk"]["activated_params"] == rec["accounting"]["activated_params"]
    assert rows["topk"]["decode_ms_per_token"] == rec["decode"]["ms_per_token"]
    assert rows["run"]["decode_ms_per_token"] == summary["decode"]["ms_per_token"]
    assert rows["topk"]["tasks"]["heldout kjv-tail/ppl"] == rec["heldout"]["kjv-tail"]["ppl"]
    assert rows["run"]["tasks"] == {} and rows["topk"]["tokens"] is None  # training tokens: a record has none
    r = cli("compare", run, tmp_path)  # a folder of records is found like a folder of runs
    assert r.code == 0, r.err
    header, *lines = r.out.splitlines()
    for column in ("act.params", "decode ms/tok", "heldout kjv-tail/ppl", "heldout stdlib/ppl", "differs in"):
        assert column in header
    cells = {ln.split()[0]: ln for ln in lines}
    threads = torch.get_num_threads()
    assert f"({threads}t eager)" in cells["run"] and f"({threads}t eager)" in cells["topk"]
    assert cells["topk"].split()[1] == "-"  # no seeds
    assert 'model.sparsity.kind="topk"' in cells["topk"] and 'model.sparsity.kind="none"' in cells["run"]


def test_decode_alone_remeasures_a_record_or_a_run(run, tmp_path, cli):
    rec = tmp_path / "rec"
    assert cli("eval", run, "--set", TOPK, "--batches", "1", "--save", rec).code == 0
    before = json.loads((rec / "evaluation.json").read_text())
    r = cli("eval", rec, "--decode", "--json")
    assert r.code == 0, r.err
    after = json.loads((rec / "evaluation.json").read_text())
    assert after["decode"] == json.loads(r.out)["decode"] != before["decode"]
    assert {k: v for k, v in after.items() if k != "decode"} == {k: v for k, v in before.items() if k != "decode"}
    assert json.loads(r.out)["overrides"] == [TOPK]  # the record's model is loaded as it was
    r = cli("eval", run, "--decode", "--json")
    assert r.code == 0, r.err
    assert json.loads((run / "decode.json").read_text()) == json.loads(r.out)["decode"]
    row = json.loads(cli("compare", run, "--json").out)[0]
    assert row["decode_ms_per_token"] == json.loads(r.out)["decode"]["ms_per_token"]  # decode.json before summary
    (run / "decode.json").unlink()


def test_bad_input_is_one_line_and_writes_nothing(run, tmp_path, cli):
    other = tmp_path / "notes"
    other.mkdir()
    (other / "a.txt").write_text("mine")
    cases = [
        (("--save", other), "not an evaluation record"),
        (("--save", run), "a run folder"),
        (("--save", other / "a.txt"), "is a file"),
        (("--decode", "--heldout", "--save", tmp_path / "new"), "--decode only times decoding"),
        (("--limit", "3", "--save", tmp_path / "new"), "--limit N needs --tasks"),
        (("--batch-size", "2", "--save", tmp_path / "new"), "--batch-size need --tasks"),
        (("--set", "model.sparsity.keep=", "--save", tmp_path / "new"), "model.sparsity"),
    ]
    for args, message in cases:
        r = cli("eval", run, *args)
        assert r.code == 2 and message in r.err and len(r.err.strip().splitlines()) == 1, (args, r.err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"] and (other / "a.txt").read_text() == "mine"
    assert not (run / "decode.json").exists()
    r = cli("compare", tmp_path / "notes")
    assert r.code == 2 and "nor an evaluation record" in r.err


def test_a_record_refuses_when_its_checkpoint_changed_and_scaling_takes_no_records(run, tmp_path, cli):
    rec = tmp_path / "rec"
    assert cli("eval", run, "--decode", "--save", rec).code == 0
    (run / "decode.json").unlink(missing_ok=True)
    data = json.loads((rec / "evaluation.json").read_text())
    (rec / "evaluation.json").write_text(json.dumps({**data, "sha256": "0" * 64}))
    r = cli("eval", rec, "--decode")
    assert r.code == 2 and "now holds other weights" in r.err
    (rec / "evaluation.json").write_text(json.dumps({**data, "format": 7}))
    r = cli("compare", rec)
    assert r.code == 2 and "format 7, this zoo reads 1" in r.err
    with pytest.raises(zoo.ZooError, match="an evaluation record, not a run folder"):
        find_runs([rec])
