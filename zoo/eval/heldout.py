"""Two held-out texts for every real-model figure: in-domain, the last tokens of the King James Bible
(the bundled corpus), and out-of-domain, a fixed set of Python standard-library modules (text that
ships with every Python install; the files differ a little between Python versions, so reports name
the version). A retrofit cannot look good on both by learning the KJV alone."""

from __future__ import annotations

import sys
import sysconfig
from pathlib import Path

import numpy as np
import torch

from zoo.data.corpus import KJV
from zoo.data.tokenize import Tokenizer
from zoo.data.tokens import token_file
from zoo.errors import ZooError
from zoo.eval.evaluate import evaluate

TOKENS = 2048  # of each text
STDLIB = ("textwrap.py", "heapq.py", "fractions.py")  # concatenated in this order; its first TOKENS tokens


def stdlib_text() -> str:
    folder = Path(sysconfig.get_paths()["stdlib"])
    missing = [name for name in STDLIB if not (folder / name).is_file()]
    if missing:
        raise ZooError(f"{folder / missing[0]}: missing from this Python's standard library")
    return "".join((folder / name).read_text(encoding="utf-8") for name in STDLIB)


def texts(tok: Tokenizer, n: int = TOKENS) -> dict[str, np.ndarray]:
    """{'kjv-tail': the KJV's last n tokens, 'stdlib': the first n tokens of the STDLIB modules}."""
    return {"kjv-tail": np.asarray(token_file(KJV(), tok)[-n:], dtype=np.int64),
            "stdlib": np.asarray(tok.encode_array(stdlib_text())[:n], dtype=np.int64)}


def windows(ids: np.ndarray, window: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive non-overlapping (inputs, targets) of up to `window` tokens: every token after the first is
    predicted once, from the context of its window."""
    t = torch.from_numpy(ids)
    spans = [(s, min(s + window, len(t) - 1)) for s in range(0, len(t) - 1, window)]
    return [(t[s:e][None], t[s + 1:e + 1][None]) for s, e in spans]


@torch.no_grad()
def heldout(model, tok: Tokenizer, window: int = 1024, precision: str = "fp32") -> dict[str, dict]:
    """Loss, perplexity and measured sparsity of `model` on each held-out text (windows of `window` tokens)."""
    window = min(window, model.config.max_seq_len)
    out = {}
    for name, ids in texts(tok).items():
        r = evaluate(model, windows(ids, window), precision)
        out[name] = {"tokens": r["tokens"], "loss": r["val_loss"], "ppl": r["val_ppl"],
                     "sparsity": r["sparsity"]["overall"], "window": window}
    out["python"] = sys.version.split()[0]
    return out
