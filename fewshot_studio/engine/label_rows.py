"""The one row schema of every label file format (:mod:`.export`'s ``EXPORT_FORMATS``).

A prediction becomes one row keyed by :data:`CSV_COLUMNS` (:func:`row_values`): ``path``
(relative to the query root with ``/`` separators, or absolute), ``label`` (None for unknown
and error), ``confidence`` and ``margin`` (rounded to 6 decimals; None for errors), ``status``
(ok | unknown | error), ``error`` (the reason), ``top1``..``top3`` with
``top1_prob``..``top3_prob``, ``corrected`` (bool). A prediction with a non-finite
confidence, margin or probability becomes an error row ("model produced non-finite values",
:func:`checked`): no file ever holds ``NaN`` or ``Infinity``.

Spreadsheet safety (CSV only): a cell that starts with ``=``, ``+``, ``-``, ``@``, a tab or a
carriage return is run as a formula by spreadsheets. So a relative ``path`` that starts with
one of them gets a ``./`` prefix (the same path for any program), and a text cell (``label``,
``error``, ``top1``..``top3``) that starts with one of them, or with an apostrophe, gets a
leading apostrophe ``'`` (spreadsheets show the text without it). :func:`csv_unsafe` undoes
both, so a round trip gives the original values.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from fewshot_studio.engine.api import Prediction, Status

CSV_COLUMNS = ("path", "label", "confidence", "margin", "status", "error",
               "top1", "top1_prob", "top2", "top2_prob", "top3", "top3_prob", "corrected")
JSON_FORMAT = "fewshot-studio/labels-1"
"""The ``format`` of our labels JSON, and of our Parquet file's key-value metadata."""
FIFTYONE_FORMAT = "fewshot-studio/fiftyone-1"
LABELSTUDIO_FORMAT = "fewshot-studio/labelstudio-1"
DUPLICATES_COLUMNS = ("group", "path", "similarity")  # ``fewshot-studio duplicates``
NON_FINITE_ERROR = "model produced non-finite values"

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_TEXT_COLUMNS = ("label", "error", "top1", "top2", "top3")


def display_path(path: Path, root: Path, absolute_paths: bool = False) -> str:
    """``path`` relative to ``root`` (posix separators), or absolute when asked or when it
    is not under ``root``."""
    full = os.path.abspath(path)
    if absolute_paths:
        return full
    if os.name == "posix":  # string prefix of normalised paths: pathlib's rule, 5x faster
        base = os.path.abspath(root)
        if full == base:
            return "."
        prefix = base if base.endswith("/") else base + "/"
        return full[len(prefix):] if full.startswith(prefix) else full
    try:
        return Path(full).relative_to(Path(os.path.abspath(root))).as_posix()
    except ValueError:
        return full


def checked(p: Prediction) -> Prediction:
    """``p``, or an error prediction when it holds a non-finite number (a broken model)."""
    if p.status == Status.ERROR:
        return p
    numbers = [p.confidence, p.margin, *(prob for _, prob in p.top)]
    if all(math.isfinite(float(v)) for v in numbers):
        return p
    return replace(p, label=None, confidence=0.0, margin=0.0, status=Status.ERROR, top=(),
                   error=NON_FINITE_ERROR, corrected=False)


def row_values(p: Prediction, root: Path, absolute_paths: bool = False) -> dict[str, Any]:
    """One prediction as typed values keyed by :data:`CSV_COLUMNS` (non-finite numbers make
    it an error row, see :func:`checked`)."""
    p = checked(p)
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


def csv_cell(v: Any) -> str:
    """A typed row value as CSV text (None empty, booleans true/false, floats 6 decimals)."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:.6f}"
    return str(v)


def csv_safe(column: str, cell: str) -> str:
    """Spreadsheet-safe form of one CSV cell (see the module docstring)."""
    if column == "path" and cell.startswith(_FORMULA_START):
        return "./" + cell
    if column in _TEXT_COLUMNS and cell.startswith((*_FORMULA_START, "'")):
        return "'" + cell
    return cell


def csv_unsafe(column: str, cell: str) -> str:
    """Undo :func:`csv_safe`."""
    if column == "path" and cell.startswith("./") and cell[2:].startswith(_FORMULA_START):
        return cell[2:]
    if column in _TEXT_COLUMNS and cell.startswith("'"):
        return cell[1:]
    return cell


def sorted_predictions(predictions: Sequence[Prediction]) -> list[Prediction]:
    """``predictions`` in file order: sorted by path (as :class:`~pathlib.Path` compares)."""
    return sorted(predictions, key=lambda p: Path(p.path))
