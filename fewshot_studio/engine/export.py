"""Exports of a labeling run: CSV and JSON (written atomically), and copying or moving the
query images into one folder per class.

CSV (UTF-8, a header, one row per query file sorted by path), columns :data:`CSV_COLUMNS`:
``path`` (relative to the query root with ``/`` separators, or absolute), ``label`` (empty
for unknown and error), ``confidence`` and ``margin`` (6 decimals; empty for errors),
``status`` (ok | unknown | error), ``error`` (the reason), ``top1``..``top3`` with
``top1_prob``..``top3_prob``, ``corrected`` (true | false).

JSON: ``{"format": "fewshot-studio/labels-1", "root": ..., "columns": [...], "rows": [...]}``
where each row has the CSV's fields with JSON types (numbers, null, booleans).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from fewshot_studio.engine.api import Prediction, Status
from fewshot_studio.errors import UserError
from fewshot_studio.io.atomic import atomic_write_text
from fewshot_studio.progress import Progress

CSV_COLUMNS = ("path", "label", "confidence", "margin", "status", "error",
               "top1", "top1_prob", "top2", "top2_prob", "top3", "top3_prob", "corrected")
JSON_FORMAT = "fewshot-studio/labels-1"
UNKNOWN_FOLDER = "_unknown"



def display_path(path: Path, root: Path, absolute_paths: bool = False) -> str:
    """``path`` relative to ``root`` (posix separators), or absolute when asked or when it
    is not under ``root``."""
    path = Path(os.path.abspath(path))
    if not absolute_paths:
        try:
            return path.relative_to(Path(os.path.abspath(root))).as_posix()
        except ValueError:
            pass
    return str(path)


def row_values(p: Prediction, root: Path, absolute_paths: bool = False) -> dict[str, Any]:
    """One prediction as typed values keyed by :data:`CSV_COLUMNS`."""
    err = p.status == Status.ERROR
    row: dict[str, Any] = {
        "path": display_path(p.path, root, absolute_paths),
        "label": p.label,
        "confidence": None if err else round(float(p.confidence), 6),
        "margin": None if err else round(float(p.margin), 6),
        "status": p.status.value,
        "error": p.error,
    }
    for k in range(3):
        name, prob = p.top[k] if k < len(p.top) else (None, None)
        row[f"top{k + 1}"] = name
        row[f"top{k + 1}_prob"] = None if prob is None else round(float(prob), 6)
    row["corrected"] = bool(p.corrected)
    return row


def _csv_cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:.6f}"
    return str(v)


def _sorted(predictions: Sequence[Prediction]) -> list[Prediction]:
    return sorted(predictions, key=lambda p: Path(p.path))


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


def write_csv(predictions: Sequence[Prediction], out: Path, root: Path,
              absolute_paths: bool = False) -> Path:
    """Write the CSV (see module docstring) atomically; returns ``out``."""
    preds = _sorted(predictions)

    def write(f: io.TextIOBase) -> None:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(CSV_COLUMNS)
        for p in preds:
            row = row_values(p, root, absolute_paths)
            w.writerow([_csv_cell(row[c]) for c in CSV_COLUMNS])

    return atomic_write(out, write)


def write_json(predictions: Sequence[Prediction], out: Path, root: Path,
               absolute_paths: bool = False) -> Path:
    """Write the JSON (see module docstring) atomically; returns ``out``."""
    preds = _sorted(predictions)

    def write(f: io.TextIOBase) -> None:
        doc = {
            "format": JSON_FORMAT,
            "root": str(Path(os.path.abspath(root))),
            "columns": list(CSV_COLUMNS),
            "rows": [row_values(p, root, absolute_paths) for p in preds],
        }
        json.dump(doc, f, ensure_ascii=False, indent=1)
        f.write("\n")

    return atomic_write(out, write)


def read_csv(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """The rows of a labels CSV as dicts of strings (for tests and round-trips)."""
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


_UNSAFE = re.compile(r'[\\/:*?"<>|\x00-\x1f]')


def safe_folder_name(label: str) -> str:
    """A class name as a single, safe folder name (separators and reserved characters
    replaced by ``_``; never empty, ``.`` or ``..``)."""
    name = _UNSAFE.sub("_", label).strip().rstrip(".")
    if name in ("", ".", ".."):
        name = "_"
    return name


def _free_name(folder: Path, name: str, taken: set[Path]) -> Path:
    target = folder / name
    if not target.exists() and target not in taken:
        return target
    stem, suffix = os.path.splitext(name)
    i = 1
    while True:
        target = folder / f"{stem}_{i}{suffix}"
        if not target.exists() and target not in taken:
            return target
        i += 1


def copy_to_class_folders(predictions: Sequence[Prediction], dest: Path,
                          move: bool = False) -> Iterator[Progress]:
    """Copy (or move) each labeled image into ``dest/<label>/``; unknown ones go to
    ``dest/_unknown/``; error rows are left where they are. Name collisions get ``_1``,
    ``_2``... before the suffix. Yields Progress per file with ``payload`` = ``(source,
    destination or None, error reason)``; the last one's ``metrics`` count ``copied``
    (or ``moved``), ``failed`` and ``skipped``."""
    dest = Path(dest)
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {dest}: {e.strerror or e}") from None
    preds = _sorted(predictions)
    total = len(preds)
    verb = "moved" if move else "copied"
    counts = {verb: 0, "failed": 0, "skipped": 0}
    taken: set[Path] = set()
    made: set[Path] = set()
    for i, p in enumerate(preds, 1):
        if p.status == Status.ERROR and not p.corrected:
            counts["skipped"] += 1
            yield Progress(i, total, "skipped (error)", dict(counts), (p.path, None, p.error))
            continue
        folder = dest / (safe_folder_name(p.label) if p.label else UNKNOWN_FOLDER)
        try:
            if folder not in made:
                folder.mkdir(parents=True, exist_ok=True)
                made.add(folder)
            target = _free_name(folder, p.path.name, taken)
            taken.add(target)
            if move:
                shutil.move(os.fspath(p.path), os.fspath(target))
            else:
                shutil.copy2(p.path, target)
        except OSError as e:
            counts["failed"] += 1
            yield Progress(i, total, f"failed: {p.path.name}", dict(counts),
                           (p.path, None, str(e.strerror or e)))
            continue
        counts[verb] += 1
        yield Progress(i, total, p.path.name, dict(counts), (p.path, target, ""))
