"""Atomic writes keep the old file on failure, leave no temp files and use normal permissions."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from fewshot_studio.io.atomic import (
    STALE_TEMP_AGE_S,
    atomic_path,
    atomic_write_text,
    remove_stale_temps,
)


def test_new_file_gets_umask_permissions_not_0600(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        out = atomic_write_text(tmp_path / "a.txt", "hello")
    finally:
        os.umask(old)
    assert out.read_text() == "hello"
    assert out.stat().st_mode & 0o777 == 0o644


def test_existing_permissions_are_kept(tmp_path: Path) -> None:
    out = tmp_path / "a.txt"
    out.write_text("old")
    out.chmod(0o640)
    atomic_write_text(out, lambda f: f.write("new"))
    assert out.read_text() == "new"
    assert out.stat().st_mode & 0o777 == 0o640


def test_failure_keeps_old_file_and_removes_temp(tmp_path: Path) -> None:
    out = tmp_path / "a.bin"
    out.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(out) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed mid-write")
    assert out.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]


def _aged(path: Path, seconds: float, data: bytes = b"") -> Path:
    """``path`` written with ``data`` and its modification time ``seconds`` in the past."""
    path.write_bytes(data)
    then = time.time() - seconds
    os.utime(path, (then, then))
    return path


def test_stale_temp_files_of_ours_are_removed(tmp_path: Path) -> None:
    """Only our naming pattern, only once stale: a fresh temp (a concurrent writer's) and the
    user's hidden .tmp files stay."""
    old = STALE_TEMP_AGE_S + 60
    stale = _aged(tmp_path / ".m.onnx.k2x_9abq.tmp", old)
    stale_other = _aged(tmp_path / ".labels.csv.a1b2c3d4.tmp", old, b"half a csv")
    fresh = _aged(tmp_path / ".m.onnx.zzzzzzzz.tmp", 5)
    users = [_aged(tmp_path / n, old, b"mine") for n in
             (".notes.tmp", ".m.onnx.tmp", ".m.onnx.ABCDEFGH.tmp", "m.onnx.abcdefgh.tmp",
              ".m.onnx.abcdefgh.tmp.bak", ".m.onnx.abcdefg.tmp")]
    (tmp_path / ".dir.abcdefgh.tmp").mkdir()
    os.utime(tmp_path / ".dir.abcdefgh.tmp", (time.time() - old,) * 2)

    assert remove_stale_temps(tmp_path, "m.onnx") == [stale]
    assert stale_other.exists()
    assert remove_stale_temps(tmp_path) == [stale_other]
    assert fresh.exists() and all(u.read_bytes() == b"mine" for u in users)
    assert (tmp_path / ".dir.abcdefgh.tmp").is_dir()
    assert remove_stale_temps(tmp_path / "missing") == []


def test_atomic_path_removes_its_targets_stale_temps(tmp_path: Path) -> None:
    """A kill -9 mid-write left a temp file: the next write of that file removes it, and
    leaves another file's fresh temp alone."""
    left = _aged(tmp_path / ".a.txt.q1w2e3r4.tmp", STALE_TEMP_AGE_S + 1)
    other = _aged(tmp_path / ".b.txt.q1w2e3r4.tmp", STALE_TEMP_AGE_S + 1)
    atomic_write_text(tmp_path / "a.txt", "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == [other.name, "a.txt"]
    assert not left.exists()
