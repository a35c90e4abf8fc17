"""Tiny runs for the train / eval / compare tests: a made-up corpus and a model of a few thousand weights."""

from __future__ import annotations

import random
from pathlib import Path

import torch
from torch import nn

import zoo
from tests.conftest import RECIPES

WORDS = "the and of to in that he shall unto for his i a lord they be is him not them it with all".split()

TINY = {
    "model.d_model": 32, "model.n_layers": 2, "model.n_heads": 4, "model.max_seq_len": 64, "model.ffn.hidden": 64,
    "train.batch_size": 4, "train.seq_len": 32, "train.steps": 6, "train.eval_every": 3, "train.eval_batches": 2,
    "train.log_every": 1, "train.schedule.warmup_steps": 2,
}


def write_corpus(path: Path, lines: int = 600, seed: int = 0) -> Path:
    rng = random.Random(seed)
    path.write_text("".join(" ".join(rng.choices(WORDS, k=rng.randint(4, 12))) + ".\n" for _ in range(lines)))
    return path


def tiny_run(tmp_path: Path, **overrides) -> zoo.Recipe:
    """The dense tiny recipe shrunk further, training on a made-up text file in tmp_path."""
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        write_corpus(corpus)
    return zoo.load_recipe(RECIPES / "tiny/dense.toml", {
        **TINY, "data.dataset": {"kind": "files", "paths": [str(corpus)]},
        **{k.replace("__", "."): v for k, v in overrides.items()}})


def fit(model, idx, steps: int, lr: float) -> list[float]:
    """AdamW on next-token prediction of `idx` for `steps` steps; the cross-entropy of each step."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        out = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        out.total_loss.backward()
        opt.step()
        losses.append(out.loss.item())
    return losses


class Times(nn.Module):
    """x * factor: the activation the fake plugins in the registry tests register."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor
