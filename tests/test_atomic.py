"""Atomic writes keep the old file on failure, leave no temp files and use normal permissions."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fewshot_studio.io.atomic import atomic_path, atomic_write_text


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
