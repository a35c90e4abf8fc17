"""zoo's local lm-eval tasks, over data generated from bundled text (no dataset hub is needed).

- `zoo_kjv_next_verse` (multiple choice, acc / acc_norm): a verse from the last 1,000 of the KJV, then
  which of 4 verses follows it: the true next verse or 3 others drawn from the same range (seed 0).
- `zoo_kjv_rolling` (rolling perplexity): the last 5 chapters of the KJV (Revelation 18-22), a document each.
- `zoo_stdlib_rolling` (rolling perplexity): the Python standard-library modules of zoo.eval.heldout, a
  document each (out-of-domain).

Each task's data is one JSONL file, generated on first use into $ZOO_CACHE/lm-eval/ (written
atomically); the task definitions are the lm-eval configs `task_config` returns.
"""

from __future__ import annotations

import json
import random
import sysconfig
from collections.abc import Callable
from pathlib import Path
from typing import Any

from zoo.data.corpus import KJV
from zoo.data.tokenize import cache_dir
from zoo.errors import ZooError
from zoo.eval.heldout import STDLIB, stdlib_text
from zoo.files import write_atomic

VERSION = 1  # bump when the generated data changes


def _verses() -> list[dict]:
    path = KJV()._path()
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def kjv_next_verse(n: int = 200, tail: int = 1000, seed: int = 0) -> list[dict]:
    verses = [v["text"] for v in _verses()[-tail:]]
    rng = random.Random(seed)
    docs = []
    for i in sorted(rng.sample(range(len(verses) - 1), n)):
        others = rng.sample([j for j in range(len(verses)) if j not in (i, i + 1)], 3)
        label = rng.randrange(4)
        choices = [verses[j] for j in others]
        choices.insert(label, verses[i + 1])
        docs.append({"context": verses[i], "choices": choices, "label": label})
    return docs


def kjv_rolling(chapters: int = 5) -> list[dict]:
    by_chapter: dict[tuple[str, int], list[str]] = {}
    for v in _verses():
        by_chapter.setdefault((v["book"], v["chapter"]), []).append(v["text"])
    return [{"text": "\n".join(texts) + "\n"} for texts in list(by_chapter.values())[-chapters:]]


def stdlib_rolling() -> list[dict]:
    stdlib_text()  # one line naming a missing module
    folder = Path(sysconfig.get_paths()["stdlib"])
    return [{"text": (folder / name).read_text(encoding="utf-8")} for name in STDLIB]


ROLLING = {"output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
           "metric_list": [{"metric": m, "aggregation": agg, "higher_is_better": False} for m, agg in (
               ("word_perplexity", "weighted_perplexity"), ("byte_perplexity", "weighted_perplexity"),
               ("bits_per_byte", "bits_per_byte"))]}
CHOICE = {"output_type": "multiple_choice", "doc_to_text": "{{context}}", "doc_to_choice": "{{choices}}",
          "doc_to_target": "{{label}}", "target_delimiter": " ",
          "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                          {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]}
LOCAL: dict[str, tuple[Callable[[], list[dict]], dict[str, Any]]] = {
    "zoo_kjv_next_verse": (kjv_next_verse, CHOICE),
    "zoo_kjv_rolling": (kjv_rolling, ROLLING),
    "zoo_stdlib_rolling": (stdlib_rolling, ROLLING),
}


def data_file(name: str) -> Path:
    """The task's JSONL data, generated on first use."""
    path = cache_dir() / "lm-eval" / f"{name}-v{VERSION}.jsonl"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, "".join(json.dumps(doc) + "\n" for doc in LOCAL[name][0]()))
    return path


def task_config(name: str, path: Path | None = None) -> dict[str, Any]:
    """The lm-eval task config of local task `name`, reading `path` (default: its generated data file)."""
    path = Path(path) if path is not None else data_file(name)
    if not path.is_file():
        raise ZooError(f"lm-eval task {name}: data file {path} is missing")
    return {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(path)}},
            "test_split": "test", **LOCAL[name][1], "metadata": {"version": VERSION}}

