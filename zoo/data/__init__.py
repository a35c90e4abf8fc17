"""Data: text sources (slot `dataset`), tokenizers (slot `tokenizer`) and cached token splits."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from zoo.data import corpus, tokenize
from zoo.data.corpus import Corpus
from zoo.data.tokenize import TOKENIZER_FILE, ByteTokenizer, Tokenizer, cache_dir, load_tokenizer_file
from zoo.data.tokens import Windows, split_tokens, token_file, val_batches
from zoo.errors import RecipeError
from zoo.registry import get_registry


@dataclass
class Data:
    """A recipe's tokenizer and its train / validation token arrays (memory-mapped)."""

    tokenizer: Tokenizer
    train: np.ndarray
    val: np.ndarray


def build_corpus(recipe) -> Corpus:
    """The `[data] dataset` block of `recipe`, built."""
    return get_registry().build(recipe.data.dataset, recipe.source, file=recipe.source or None)


def build_tokenizer(recipe, corpus: Corpus | None = None) -> Tokenizer:
    """The `[data] tokenizer` of `recipe`, checked against `model.vocab_size`."""
    spec = recipe.data.tokenizer
    tok = get_registry().build(spec, corpus, file=recipe.source or None)
    if tok.vocab_size > recipe.model.vocab_size:
        raise RecipeError(f"the {spec.kind!r} tokenizer has {tok.vocab_size} tokens; set model.vocab_size "
                          f">= {tok.vocab_size}", file=recipe.source or None, path="model.vocab_size")
    return tok


def checkpoint_tokenizer(ckpt: Path, recipe) -> Tokenizer:
    """The tokenizer a checkpoint was trained or imported with: its tokenizer.json, else the recipe's."""
    path = Path(ckpt) / TOKENIZER_FILE
    if path.is_file():
        return load_tokenizer_file(path)
    return build_tokenizer(recipe, build_corpus(recipe))


def load_data(recipe) -> Data:
    """Tokenize (or reuse the cache of) the recipe's corpus and split it into train / validation."""
    src = build_corpus(recipe)
    tok = build_tokenizer(recipe, src)
    train, val = split_tokens(src, tok, recipe.data.val_fraction)
    return Data(tok, train, val)


def register(registry) -> None:
    corpus.register(registry)
    tokenize.register(registry)


__all__ = ["TOKENIZER_FILE", "ByteTokenizer", "Corpus", "Data", "Tokenizer", "Windows", "build_corpus",
           "build_tokenizer", "cache_dir", "checkpoint_tokenizer", "load_data", "load_tokenizer_file",
           "split_tokens", "token_file", "val_batches"]
