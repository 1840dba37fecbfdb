"""Atomic file writes: write to a temp file beside the target, then ``os.replace`` it over the
target. Readers see the old file or the new one, never half of one; a failure leaves the old
file and no temp file behind. The new file gets the target's existing permissions, or the usual
ones for a new file (0o666 minus the umask), not mkstemp's 0o600.

A process killed outright (kill -9, power loss) keeps the old file too, but leaves its temp
file, a hidden ``.<name>.<8 random characters>.tmp`` beside the target: :func:`atomic_path`
removes its target's stale ones, and :func:`remove_stale_temps` any of a folder's, once they
are :data:`STALE_TEMP_AGE_S` old."""

from __future__ import annotations

import contextlib
import io
import os
import re
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

_UMASK = os.umask(0o022)  # read once at import (the umask is process-wide)
os.umask(_UMASK)

STALE_TEMP_AGE_S = 10 * 60
"""A temp file of ours this old (by modification time) belongs to a killed process: the
longest write through :func:`atomic_path` (int8 quantisation of EfficientNet-Lite0) takes
seconds, so a live writer's temp file is never this old."""

# mkstemp's random part: 8 characters of [a-z0-9_] (tempfile._RandomNameSequence).
_TEMP_NAME = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp")


def remove_stale_temps(folder: str | os.PathLike[str], name: str | None = None,
                       older_than: float = STALE_TEMP_AGE_S) -> list[Path]:
    """Remove the temp files :func:`atomic_path` left in ``folder`` (only ours: regular files
    named ``.<name>.<8 random characters>.tmp``, for the target ``name`` only when given, not
    modified for ``older_than`` seconds, so a concurrent writer keeps its file). Returns the
    removed paths. Never raises: a missing or unreadable folder, or a file that cannot be
    removed, is left as it is."""
    now, removed = time.time(), []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP_NAME.fullmatch(entry.name)
        if not m or (name is not None and m["name"] != name):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISREG(st.st_mode) and now - st.st_mtime >= older_than:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            continue
    return removed


@contextlib.contextmanager
def atomic_path(out: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp path beside ``out``; when the block succeeds it replaces ``out``. Stale
    temp files of earlier writes of ``out`` (a killed process's) are removed first.

    Raises ``OSError`` if the temp file cannot be created (e.g. the folder is not writable).
    """
    out = Path(out)
    parent = out.parent if str(out.parent) else Path(".")
    remove_stale_temps(parent, out.name)
    fd, name = tempfile.mkstemp(dir=parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with contextlib.suppress(OSError):
            mode = out.stat().st_mode & 0o7777 if out.exists() else 0o666 & ~_UMASK
            os.chmod(tmp, mode)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(out: str | os.PathLike[str],
                      write: Callable[[io.TextIOBase], None] | str) -> Path:
    """Write a UTF-8 text file atomically, from a string or through ``write(f)``; fsynced."""
    out = Path(out)
    with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        if isinstance(write, str):
            f.write(write)
        else:
            write(f)
        f.flush()
        os.fsync(f.fileno())
    return out
