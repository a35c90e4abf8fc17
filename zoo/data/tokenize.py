"""Tokenizers (slot `tokenizer`): bytes (default), BPE trained on the corpus and cached, or a user's
`tokenizer.json`. The factory is `factory(cfg, corpus)`; the corpus is what BPE trains on."""

from __future__ import annotations

import codecs
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from zoo.contracts import Corpus, Tokenizer
from zoo.errors import ZooError
from zoo.files import write_atomic
from zoo.schema import PathStr, param

TOKENIZER_FILE = "tokenizer.json"


def cache_dir() -> Path:
    """Where tokenized corpora and trained tokenizers are cached ($ZOO_CACHE, else ~/.cache/zoo)."""
    return Path(os.environ.get("ZOO_CACHE") or Path.home() / ".cache" / "zoo")


@dataclass(frozen=True)
class BytesConfig:
    """UTF-8 bytes as tokens (vocabulary 256), no training needed"""


class ByteTokenizer(Tokenizer):
    vocab_size = 256
    fingerprint = "bytes"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def stream_decoder(self):
        dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        return lambda ids: dec.decode(bytes(int(i) for i in ids))


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` (BPE trained here, or loaded from a tokenizer.json)."""

    def __init__(self, tok, fingerprint: str):
        self.tok, self.fingerprint = tok, fingerprint
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def to_json(self) -> str:
        return self.tok.to_str()


def _from_json(text: str, origin: str) -> HFTokenizer:
    from tokenizers import Tokenizer as HFTok

    try:
        tok = HFTok.from_str(text)
    except Exception as err:  # tokenizers raises plain Exception subclasses
        raise ZooError(f"{origin}: not a valid tokenizer.json ({err})") from None
    return HFTokenizer(tok, "json-" + hashlib.sha256(text.encode()).hexdigest()[:16])


@dataclass(frozen=True)
class BPEConfig:
    """byte-level BPE trained on the corpus with the `tokenizers` library (cached)"""

    vocab_size: int = param(1024, "vocabulary size, including the 256 byte tokens", ge=257, le=1 << 20)
    min_frequency: int = param(2, "merge only pairs seen at least this often", ge=1)


def train_bpe(cfg: BPEConfig, corpus: Corpus) -> HFTokenizer:
    """Train (or reuse from the cache) a byte-level BPE on `corpus`."""
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    key = hashlib.sha256(f"{corpus.fingerprint()}|{cfg.vocab_size}|{cfg.min_frequency}".encode()).hexdigest()[:16]
    path = cache_dir() / "tokenizers" / f"bpe-{key}.json"
    if path.is_file():
        return _from_json(path.read_text(encoding="utf-8"), str(path))
    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus.chunks(), trainer=trainer)
    text = tok.to_str()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, text)
    return _from_json(text, str(path))


@dataclass(frozen=True)
class FileTokenizerConfig:
    """a tokenizer.json file (Hugging Face `tokenizers` format), e.g. from an imported model"""

    path: PathStr = param(doc="path to tokenizer.json")


def load_tokenizer_file(path: str | Path) -> HFTokenizer:
    path = Path(path).expanduser()
    if not path.is_file():
        raise ZooError(f"{path}: tokenizer file not found")
    return _from_json(path.read_text(encoding="utf-8"), str(path))


def register(registry) -> None:
    registry.register("tokenizer", "bytes", BytesConfig, lambda cfg, corpus=None: ByteTokenizer())
    registry.register("tokenizer", "bpe", BPEConfig, train_bpe)
    registry.register("tokenizer", "file", FileTokenizerConfig, lambda cfg, corpus=None: load_tokenizer_file(cfg.path))
