"""zoo.files: an atomic write leaves the old content or the new one, never a partial file or a stray temp."""

from __future__ import annotations

import os

import pytest

from zoo import files
from zoo.files import atomic_folder, atomic_open, write_atomic


class Boom(Exception):
    pass


@pytest.fixture
def synced(monkeypatch):
    """The paths (files and folders) fsynced during the test, in order."""
    done = []
    fsync = os.fsync

    def record(fd):
        done.append(os.readlink(f"/proc/self/fd/{fd}"))
        fsync(fd)

    monkeypatch.setattr(files.os, "fsync", record)
    return done


def test_write_replaces_the_file_and_syncs_it_then_its_folder(tmp_path, synced):
    target = tmp_path / "a.json"
    target.write_text("old")
    write_atomic(target, "new ü")
    assert target.read_text(encoding="utf-8") == "new ü"
    write_atomic(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert os.listdir(tmp_path) == ["a.json"]
    # each write: the temporary file's content (before the rename), then the folder (after it)
    assert [os.path.dirname(p) == str(tmp_path) and os.path.basename(p).startswith(".a.json.tmp-")
            for p in synced[0::2]] == [True, True]
    assert synced[1::2] == [str(tmp_path), str(tmp_path)]


@pytest.mark.parametrize("existing", [None, "old content"])
def test_a_failure_mid_write_leaves_no_file_and_no_temp(tmp_path, existing):
    target = tmp_path / "tokens.bin"
    if existing is not None:
        target.write_text(existing)
    with pytest.raises(Boom):
        with atomic_open(target, "wb") as f:
            f.write(b"half of it")
            f.flush()
            raise Boom
    assert os.listdir(tmp_path) == ([] if existing is None else ["tokens.bin"])
    if existing is not None:
        assert target.read_text() == existing


def test_a_failing_rename_removes_the_temp(tmp_path, monkeypatch):
    def refuse(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "replace", refuse)
    with pytest.raises(OSError, match="No space"):
        write_atomic(tmp_path / "x.txt", "text")
    assert os.listdir(tmp_path) == []


def test_atomic_open_rejects_read_and_append_modes(tmp_path):
    for mode in ("r", "a", "w+"):
        with pytest.raises(ValueError, match="one of: w, wb"):
            with atomic_open(tmp_path / "x", mode):
                pass
    assert os.listdir(tmp_path) == []


def test_folder_replaces_an_existing_one_whole(tmp_path, synced):
    out = tmp_path / "sub" / "ck"
    with atomic_folder(out) as tmp:
        (tmp / "a").write_text("1")
        (tmp / "b").write_text("2")
    with atomic_folder(out) as tmp:
        (tmp / "c").write_text("3")
    assert sorted(os.listdir(out)) == ["c"] and os.listdir(out.parent) == ["ck"]
    assert synced[-1] == str(out.parent)  # the rename made durable


def test_a_failure_while_filling_a_folder_leaves_the_old_one_and_no_temp(tmp_path):
    out = tmp_path / "ck"
    with pytest.raises(Boom):
        with atomic_folder(out) as tmp:
            (tmp / "a").write_text("partial")
            raise Boom
    assert os.listdir(tmp_path) == []
    with atomic_folder(out) as tmp:
        (tmp / "a").write_text("good")
    with pytest.raises(Boom):
        with atomic_folder(out) as tmp:
            (tmp / "a").write_text("bad")
            raise Boom
    assert os.listdir(tmp_path) == ["ck"] and (out / "a").read_text() == "good"


def test_a_failing_final_rename_puts_the_old_folder_back(tmp_path, monkeypatch):
    out = tmp_path / "ck"
    with atomic_folder(out) as tmp:
        (tmp / "a").write_text("good")
    replace = os.replace

    def fail_into_place(src, dst):
        if os.path.basename(src).startswith(".ck.tmp-"):
            raise OSError(5, "I/O error")
        replace(src, dst)

    monkeypatch.setattr(files.os, "replace", fail_into_place)
    with pytest.raises(OSError, match="I/O error"):
        with atomic_folder(out) as tmp:
            (tmp / "a").write_text("new")
    assert os.listdir(tmp_path) == ["ck"] and (out / "a").read_text() == "good"
