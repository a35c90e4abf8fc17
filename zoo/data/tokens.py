"""Token streams on disk: a corpus is tokenized once, streamed into a cached `.bin` file, and split
deterministically into train and validation blocks; batches are read from memory-mapped files."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from zoo.data.corpus import Corpus
from zoo.data.tokenize import Tokenizer, cache_dir
from zoo.errors import ZooError
from zoo.files import atomic_open

FORMAT = 1
MAX_BLOCK = 16384  # tokens per split block; every ~1/val_fraction-th block is validation


def _dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def is_val_block(i: int, val_fraction: float) -> bool:
    """Blocks i with floor((i+1)·f) > floor(i·f) are validation: evenly spread, exactly fraction f."""
    return int((i + 1) * val_fraction) > int(i * val_fraction)


def split_blocks(total: int, val_fraction: float) -> tuple[int, list[bool]]:
    """Block size and, per block, whether it is validation (at least one block is)."""
    block = max(1, min(MAX_BLOCK, total // 64))
    n = -(-total // block)
    val = [is_val_block(i, val_fraction) for i in range(n)]
    if not any(val):
        val[-1] = True
    if all(val):
        raise ZooError(f"corpus of {total} tokens is too small to split into train and validation")
    return block, val


def _folder(corpus: Corpus, tokenizer: Tokenizer) -> Path:
    key = hashlib.sha256(f"{FORMAT}|{corpus.fingerprint()}|{tokenizer.fingerprint}".encode()).hexdigest()[:16]
    return cache_dir() / "tokens" / f"{corpus.name}-{key}"


def token_file(corpus: Corpus, tokenizer: Tokenizer) -> np.ndarray:
    """All tokens of `corpus`, streamed chunk by chunk into a cached file and memory-mapped."""
    folder = _folder(corpus, tokenizer)
    path = folder / "all.bin"
    dtype = _dtype(tokenizer.vocab_size)
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_open(path, "wb") as f:
            for chunk in corpus.chunks():
                ids = np.asarray(tokenizer.encode_array(chunk))
                if ids.size and int(ids.max()) >= tokenizer.vocab_size:
                    raise ZooError(f"tokenizer produced id {int(ids.max())} >= its vocab_size {tokenizer.vocab_size}")
                ids.astype(dtype).tofile(f)
    if path.stat().st_size == 0:
        raise ZooError(f"the corpus {corpus.name!r} is empty: no text to train on")
    return np.memmap(path, dtype=dtype, mode="r")


def split_tokens(corpus: Corpus, tokenizer: Tokenizer, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) token arrays of `corpus`: blocks of the token stream, every ~1/val_fraction-th for val."""
    tokens = token_file(corpus, tokenizer)
    block, val = split_blocks(len(tokens), val_fraction)
    folder = _folder(corpus, tokenizer)
    paths = {s: folder / f"{s}-{val_fraction!r}.bin" for s in ("train", "val")}
    if not all(p.is_file() for p in paths.values()):
        for split, want in (("train", False), ("val", True)):
            with atomic_open(paths[split], "wb") as f:
                for i, is_val in enumerate(val):
                    if is_val == want:
                        f.write(tokens[i * block:(i + 1) * block].tobytes())
    return tuple(np.memmap(paths[s], dtype=tokens.dtype, mode="r") for s in ("train", "val"))


class Windows:
    """Training samples: each epoch cuts the tokens into non-overlapping windows of seq_len + 1 at a
    random shift and visits them in a random order. Sample g is a pure function of (seed, g), so the
    data position of a run is just the number of samples it consumed."""

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int):
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        self.n = len(tokens) // seq_len - 1  # windows of seq_len + 1 that fit after any shift < seq_len
        if self.n < 1:
            raise ZooError(f"the training split has {len(tokens)} tokens, too few for one sequence of "
                           f"train.seq_len={seq_len}; use more text or a smaller seq_len")
        self._epoch, self._perm, self._shift = -1, None, 0

    def start(self, g: int) -> int:
        epoch, j = divmod(g, self.n)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._shift = int(torch.randint(self.seq_len, (1,), generator=gen))
            self._perm, self._epoch = torch.randperm(self.n, generator=gen), epoch
        return self._shift + int(self._perm[j]) * self.seq_len

    def batch(self, first: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples first..first+size-1 as (inputs, targets), each [size, seq_len]."""
        rows = [self.tokens[s:s + self.seq_len + 1] for s in (self.start(g) for g in range(first, first + size))]
        xy = torch.from_numpy(np.stack(rows).astype(np.int64))
        return xy[:, :-1], xy[:, 1:]


def val_batches(tokens: np.ndarray, seq_len: int, batch_size: int, n_batches: int):
    """Fixed validation batches: up to n_batches·batch_size windows spread evenly over the split."""
    n = (len(tokens) - 1) // seq_len
    if n < 1:
        raise ZooError(f"the validation split has {len(tokens)} tokens, too few for one sequence of "
                       f"seq_len={seq_len}; use more text or a larger data.val_fraction")
    starts = np.linspace(0, n - 1, num=min(n, n_batches * batch_size)).astype(np.int64) * seq_len
    for i in range(0, len(starts), batch_size):
        rows = [tokens[s:s + seq_len + 1] for s in starts[i:i + batch_size]]
        xy = torch.from_numpy(np.stack(rows).astype(np.int64))
        yield xy[:, :-1], xy[:, 1:]
