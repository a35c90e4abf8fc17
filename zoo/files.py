"""Atomic writes: a reader, or a machine that crashes, sees the old file or the new one, never half of one.

The content goes to a temporary sibling (same folder, so the rename cannot cross file systems),
is flushed and fsynced, renamed onto the target with `os.replace`, and the folder is fsynced so
the rename itself is durable. On any failure the temporary file or folder is removed and the
target is untouched. `atomic_open` / `write_atomic` write one file, `atomic_folder` a folder.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def fsync(path: str | Path) -> None:
    """Flush a file's content, or a folder's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sibling(path: Path, tag: str = "tmp") -> Path:
    """A hidden, unique name next to `path` (".name.tmp-1a2b3c4d")."""
    return path.with_name(f".{path.name}.{tag}-{uuid.uuid4().hex[:8]}")


@contextmanager
def atomic_open(path: str | Path, mode: str = "w") -> Iterator[IO[Any]]:
    """`open(path, mode)` ("w": UTF-8 text, or "wb"), written to a temporary sibling and renamed on success."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open: mode {mode!r}; one of: w, wb")
    path = Path(path)
    tmp = sibling(path)
    try:
        with open(tmp, mode.replace("w", "x"), encoding="utf-8" if mode == "w" else None) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync(path.parent)


def write_atomic(path: str | Path, content: str | bytes) -> Path:
    """Write `content` (text as UTF-8) to `path` atomically."""
    with atomic_open(path, "wb" if isinstance(content, bytes) else "w") as f:
        f.write(content)
    return Path(path)


@contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """A temporary sibling folder to fill; on success it replaces `path` (a folder already there is
    moved aside, then deleted), its files, itself and the parent fsynced; on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = sibling(path)
    tmp.mkdir()
    old = None
    try:
        yield tmp
        for f in tmp.iterdir():
            fsync(f)
        fsync(tmp)
        if path.exists():
            old = sibling(path, "old")
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:
        if old is not None and not path.exists():
            os.replace(old, path)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
