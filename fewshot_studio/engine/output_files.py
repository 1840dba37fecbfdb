"""Output files of the label and duplicates commands: checked before any work, written
atomically.

:func:`check_output` refuses (UserError, before any work) an ``out`` that is one of the input
images or any existing file that is not an output this program wrote (our labels or
duplicates CSV header line, our JSON ``format``, our Label Studio ``written_by``, an empty
JSON list, or a Parquet file whose footer holds our ``format``); a previous output file is
replaced. Writes go to a temp file beside the target that is renamed over it
(:mod:`fewshot_studio.io.atomic`)."""

from __future__ import annotations

import contextlib
import io
import os
import re
import stat
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from fewshot_studio.engine.label_rows import (
    CSV_COLUMNS,
    DUPLICATES_COLUMNS,
    FIFTYONE_FORMAT,
    JSON_FORMAT,
    LABELSTUDIO_FORMAT,
)
from fewshot_studio.errors import UserError
from fewshot_studio.io.atomic import atomic_write_text

PARQUET_MAGIC = b"PAR1"
_SNIFF_BYTES = 4096
_MAX_PARQUET_FOOTER = 1 << 20  # our footer: the schema and a few row groups' statistics
_OUR_CSV_HEADERS = (",".join(CSV_COLUMNS), ",".join(DUPLICATES_COLUMNS))
_JSON_HEAD = re.compile(r'\A\ufeff?\s*\{\s*"format"\s*:\s*"(?:'
                        + "|".join(map(re.escape, (JSON_FORMAT, FIFTYONE_FORMAT))) + ')"')
_LABELSTUDIO_HEAD = re.compile(r'\A\ufeff?\s*\[\s*(?:\]\s*\Z|\{\s*"data"\s*:\s*\{\s*'
                               r'"written_by"\s*:\s*"' + re.escape(LABELSTUDIO_FORMAT) + '")')


def atomic_write(out: str | os.PathLike[str], write: Callable[[io.TextIOBase], None]) -> Path:
    """Write a UTF-8 text file through ``write(f)`` atomically (:mod:`fewshot_studio.io.atomic`);
    an output that cannot be created is a UserError."""
    try:
        return atomic_write_text(out, write)
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror or e}") from None


def ensure_writable(out: str | os.PathLike[str]) -> Path:
    """Check, before any work, that ``out`` can be written (its folder exists and accepts a
    new file; ``out`` is not a folder). Raises UserError with a one-line reason."""
    out = Path(out)
    parent = out.parent if str(out.parent) else Path(".")
    if out.is_dir():
        raise UserError(f"output path is a folder: {out}")
    if not parent.is_dir():
        raise UserError(f"output folder does not exist: {parent}")
    try:
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{out.name}.", suffix=".probe")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise UserError(f"cannot write to {parent}: {e.strerror or e}") from None
    if out.exists() and not os.access(out, os.W_OK):
        raise UserError(f"output file is not writable: {out}")
    return out


def _is_our_parquet(fd: int, size: int) -> bool:
    """Whether the open regular file ``fd`` (``size`` bytes) is a Parquet file whose footer
    (the file metadata, read as bytes: no Parquet library needed) names our ``format``."""
    if size < 12:
        return False
    tail = os.pread(fd, 8, size - 8)
    n = int.from_bytes(tail[:4], "little")
    if tail[4:] != PARQUET_MAGIC or not 0 < n <= min(_MAX_PARQUET_FOOTER, size - 12):
        return False
    return JSON_FORMAT.encode() in os.pread(fd, n, size - 8 - n)


def is_labels_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a regular file that starts like an output file this program writes
    (see the module docstring: labels or duplicates CSV, JSON, FiftyOne, Label Studio,
    Parquet). Reads at most 4 KiB (and a Parquet file's footer)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO never blocks
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return False
        raw = os.read(fd, _SNIFF_BYTES)
        if raw.startswith(PARQUET_MAGIC):
            return _is_our_parquet(fd, st.st_size)
        head = raw.decode("utf-8", errors="replace")
    except OSError:
        return False
    finally:
        os.close(fd)
    first = head.removeprefix("\ufeff").split("\n", 1)[0].rstrip("\r")
    return (first in _OUR_CSV_HEADERS or _JSON_HEAD.match(head) is not None
            or _LABELSTUDIO_HEAD.match(head) is not None)


def check_output(out: str | os.PathLike[str], inputs: Iterable[Path] = ()) -> Path:
    """Check, before any work, that the labels file ``out`` may be written: it can be created
    (:func:`ensure_writable`) and, if it exists, it is a regular file, not one of ``inputs``
    (the images read) and a labels file this program wrote. Raises UserError naming it."""
    out = Path(out)
    try:
        st = os.stat(out)
    except FileNotFoundError:
        return ensure_writable(out)
    except OSError as e:
        raise UserError(f"cannot check output file {out}: {e.strerror or e}") from None
    if stat.S_ISDIR(st.st_mode):
        raise UserError(f"output path is a folder: {out}")
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"output path is not a regular file, will not replace it: {out}")
    real = os.path.realpath(out)
    for p in inputs:
        # only same-named files are compared by inode (a hard link under another name is
        # still refused below: an image is not a labels file)
        if p.name in (out.name, os.path.basename(real)):
            with contextlib.suppress(OSError):
                if os.path.samefile(p, out):
                    raise UserError(f"output file is one of the input images: {out}")
    if not is_labels_file(out):
        raise UserError(f"output file exists and is not a labels file written by "
                        f"fewshot-studio, will not overwrite it: {out}")
    return ensure_writable(out)
