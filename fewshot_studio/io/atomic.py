"""Atomic file writes: write to a temp file beside the target, then ``os.replace`` it over the
target. Readers see the old file or the new one, never half of one; a failure (or a killed
process) leaves the old file and no temp file behind. The new file gets the target's existing
permissions, or the usual ones for a new file (0o666 minus the umask), not mkstemp's 0o600."""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

_UMASK = os.umask(0o022)  # read once at import (the umask is process-wide)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(out: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp path beside ``out``; when the block succeeds it replaces ``out``.

    Raises ``OSError`` if the temp file cannot be created (e.g. the folder is not writable).
    """
    out = Path(out)
    parent = out.parent if str(out.parent) else Path(".")
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
