"""Folder scans: the one place that decides which files of a folder are images and which
folders are classes. The engine, the CLI and the GUI all call these two functions.

* :func:`scan_images` -> :class:`QueryScan`: the image files under a folder (absolute, sorted;
  hidden files and folders skipped; a file is an image by its extension,
  :func:`~fewshot_studio.data.images.is_image_path`). A folder that cannot be listed is
  reported in the result, never skipped silently.
* :func:`class_folders` -> ``{class name: images}``, by one rule for nested and flat folders:

  - **nested** (the usual case, ``root/<class>/**/<image>``): every non-hidden sub-folder of
    ``root`` is a class named after it, holding the image files at any depth under it, possibly
    none (the caller decides: the CLI refuses an empty class, the GUI leaves it out). Image
    files directly in ``root`` are not examples of any class.
  - **flat** (``root/<image>``): when ``root`` holds image files directly and none of its
    sub-folders holds any, ``root`` is one class named after it, with those images.

  Anything else (no sub-folders and no images) gives no classes.

Qt-free and torch-free.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from fewshot_studio.data.images import is_image_path
from fewshot_studio.errors import UserError


def _abs(p: str | os.PathLike[str]) -> Path:
    return Path(os.path.abspath(os.fspath(p)))


class QueryScan(list[Path]):
    """What :func:`scan_images` found: the image files (this list: absolute paths, sorted);
    ``unreadable``: ``(folder, reason)`` per sub-folder that could not be listed;
    ``excluded``: ``{exclude entry: number of image files left out under it}``."""

    def __init__(self) -> None:
        super().__init__()
        self.unreadable: list[tuple[Path, str]] = []
        self.excluded: dict[Path, int] = {}


def scan_images(root: str | os.PathLike[str], recursive: bool = True,
                exclude: Sequence[Path] = (), what: str = "query folder") -> QueryScan:
    """Image files under ``root`` (absolute, sorted); hidden files and folders skipped;
    symbolic links to folders are not followed.

    ``exclude``: folders (everything under them) and files left out, e.g. a support folder
    or an output inside ``root``; compared by real path. UserError when ``root`` is missing
    (``"<what> not found"``), not a folder or cannot be listed; a sub-folder that cannot be
    listed is reported in the result's ``unreadable`` (see :class:`QueryScan`)."""
    root = _abs(root)
    if not root.exists():
        raise UserError(f"{what} not found: {root}")
    if not root.is_dir():
        raise UserError(f"{what} is not a folder: {root}")
    result = QueryScan()
    real_excl = [(os.path.realpath(e), _abs(e)) for e in exclude]
    for _, e in real_excl:
        result.excluded[e] = 0

    def excluded_by(real: str) -> Path | None:
        for r, e in real_excl:
            if real == r or real.startswith(r.rstrip(os.sep) + os.sep):
                return e
        return None

    def onerror(err: OSError) -> None:
        where = _abs(err.filename) if err.filename else root
        reason = err.strerror or str(err)
        if where == root:
            raise UserError(f"cannot read folder {root}: {reason}")
        if excluded_by(os.path.realpath(where)) is None:
            result.unreadable.append((where, reason))

    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=onerror):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")) if recursive else []
        real_dir = os.path.realpath(dirpath) if real_excl else ""
        dir_excl = excluded_by(real_dir) if real_excl else None
        for f in filenames:
            if not is_image_path(f):
                continue
            p = os.path.join(dirpath, f)
            if os.path.isdir(p):
                continue
            hit = dir_excl or (excluded_by(os.path.join(real_dir, f)) if real_excl else None)
            if hit is not None:
                result.excluded[hit] += 1
                continue
            found.append(Path(p))
    result.extend(sorted(found))
    result.unreadable.sort()
    return result


def _readable(scan: QueryScan, what: str) -> list[Path]:
    """The images of ``scan``; UserError naming the first folder that could not be listed."""
    for folder, reason in scan.unreadable[:1]:
        raise UserError(f"cannot read {what} {folder}: {reason}")
    return list(scan)


def class_folders(root: str | os.PathLike[str],
                  what: str = "class folder") -> dict[str, list[Path]]:
    """``{class name: its image files (absolute, sorted)}`` found in ``root`` by the nested /
    flat rule of this module's docstring; classes in sorted name order. UserError when
    ``root`` is missing, not a folder, or it or any folder under it cannot be listed (never
    skipped silently); ``what`` names ``root`` in those messages (``"support folder"``)."""
    root = _abs(root)
    if not root.exists():
        raise UserError(f"{what} not found: {root}")
    if not root.is_dir():
        raise UserError(f"{what} is not a folder: {root}")
    try:
        entries = sorted(root.iterdir())
    except OSError as e:
        raise UserError(f"cannot read {what} {root}: {e.strerror or e}") from None
    nested = {d.name: _readable(scan_images(d, recursive=True, what=what), what)
              for d in entries if not d.name.startswith(".") and d.is_dir()}
    if any(nested.values()):
        return nested
    direct = _readable(scan_images(root, recursive=False, what=what), what)
    if direct:
        return {root.name: direct}
    return nested  # sub-folders without images (empty classes), or {}
