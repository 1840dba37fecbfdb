"""Folder scans: the one place that decides which files of a folder are images and which
folders are classes. The engine, the CLI and the GUI all call these two functions.

* :func:`scan_images` -> :class:`QueryScan`: the image files under a folder (absolute, sorted;
  hidden files and folders skipped; a file is an image by its extension,
  :func:`~fewshot_studio.data.images.is_image_path`). A folder that cannot be listed is
  reported in the result, never skipped silently. It is the list of :func:`iter_images`,
  the same files one at a time in the same order (memory bounded by the folders' sizes, not
  the number of images: ``label --ray`` streams 10 million paths).
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
from collections.abc import Iterator, Sequence
from pathlib import Path

from fewshot_studio.data.images import is_image_path
from fewshot_studio.errors import UserError


def _abs(p: str | os.PathLike[str]) -> Path:
    return Path(os.path.abspath(os.fspath(p)))


class QueryScan(list[Path]):
    """What :func:`scan_images` found: the image files (this list: absolute paths, sorted);
    ``total``: how many (the list's length, or the count alone of a ``keep=False`` scan);
    ``unreadable``: ``(folder, reason)`` per sub-folder that could not be listed (sorted);
    ``excluded``: ``{exclude entry: number of image files left out under it}``."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0
        self.unreadable: list[tuple[Path, str]] = []
        self.excluded: dict[Path, int] = {}


def scan_images(root: str | os.PathLike[str], recursive: bool = True,
                exclude: Sequence[Path] = (), what: str = "query folder",
                keep: bool = True) -> QueryScan:
    """Image files under ``root`` (absolute, sorted): :func:`iter_images` as a list, with
    what it left out and could not read. ``keep=False``: count them only (``total``; the
    list stays empty), for a caller that streams them later with :func:`iter_images`."""
    result = QueryScan()
    for p in iter_images(root, recursive, exclude, what, report=result):
        result.total += 1
        if keep:
            result.append(p)
    return result


def iter_images(root: str | os.PathLike[str], recursive: bool = True,
                exclude: Sequence[Path] = (), what: str = "query folder",
                report: QueryScan | None = None) -> Iterator[Path]:
    """The image files under ``root``, one at a time, in :class:`~pathlib.Path` order
    (absolute); hidden files and folders skipped; symbolic links to folders are not followed.
    A depth-first walk, each folder's entries sorted by name: Path order compares by parts,
    so this is the sorted order without holding every path (memory: the entries of the
    folders on the current branch).

    ``exclude``: folders (everything under them) and files left out, e.g. a support folder
    or an output inside ``root``; compared by real path. UserError at once when ``root`` is
    missing (``"<what> not found"``) or not a folder, and when it is walked if it cannot be
    listed; ``report`` (when given) gets the sub-folders that cannot be listed (in order) and
    the counts left out (see :class:`QueryScan`), complete when the walk ends."""
    root = _abs(root)
    if not root.exists():
        raise UserError(f"{what} not found: {root}")
    if not root.is_dir():
        raise UserError(f"{what} is not a folder: {root}")
    report = QueryScan() if report is None else report
    real_excl = [(os.path.realpath(e), _abs(e)) for e in exclude]
    for _, e in real_excl:
        report.excluded[e] = 0
    return _walk(str(root), recursive, real_excl, report, root)


def _excluded_by(real: str, real_excl: list[tuple[str, Path]]) -> Path | None:
    for r, e in real_excl:
        if real == r or real.startswith(r.rstrip(os.sep) + os.sep):
            return e
    return None


def _entries(folder: str, report: QueryScan, real_excl: list[tuple[str, Path]],
             root: Path) -> list[tuple[str, bool]]:
    """``(name, is a folder to walk)`` of ``folder``'s images and sub-folders, sorted as
    Path sorts names; a folder that cannot be listed is reported and gives none (UserError
    for ``root``)."""
    out: list[tuple[str, bool]] = []
    try:
        with os.scandir(folder) as it:
            for e in it:
                try:
                    is_dir = e.is_dir()  # follows a link, as os.walk does
                except OSError:
                    is_dir = False
                if is_dir:
                    if not e.name.startswith(".") and not e.is_symlink():
                        out.append((e.name, True))
                elif is_image_path(e.name):
                    out.append((e.name, False))
    except OSError as err:
        where = _abs(err.filename) if err.filename else root
        reason = err.strerror or str(err)
        if where == root:
            raise UserError(f"cannot read folder {root}: {reason}") from None
        if _excluded_by(os.path.realpath(where), real_excl) is None:
            report.unreadable.append((where, reason))
        return []
    out.sort(key=lambda entry: os.path.normcase(entry[0]))
    return out


def _walk(top: str, recursive: bool, real_excl: list[tuple[str, Path]], report: QueryScan,
          root: Path) -> Iterator[Path]:
    """:func:`iter_images`' walk from ``top`` (checked)."""
    real_dir = os.path.realpath(top) if real_excl else ""
    dir_excl = _excluded_by(real_dir, real_excl) if real_excl else None
    for name, is_dir in _entries(top, report, real_excl, root):
        path = os.path.join(top, name)
        if is_dir:
            if recursive:
                yield from _walk(path, recursive, real_excl, report, root)
            continue
        hit = dir_excl or (_excluded_by(os.path.join(real_dir, name), real_excl)
                           if real_excl else None)
        if hit is not None:
            report.excluded[hit] += 1
        else:
            yield Path(path)


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
