"""A project's saved predictions: the last labeling's results with the identity of the
checkpoint that made them and each image's :data:`Stamp` (size and modification time), stored
column by column (:func:`predictions_to_dict`). They are shown again only while all of that
still holds (:func:`stamp_matches`); the rest is "not labeled". Qt-free."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fewshot_studio.engine.api import Prediction, Status
from fewshot_studio.errors import UserError
from fewshot_studio.gui.doc_fields import abs_path, rel_path, show, typed

PREDICTIONS_FORMAT = "fewshot-studio-predictions/1"
MTIME_SLACK_S = 2
"""A file's modification time may differ by this much from the saved one (FAT and zip keep
times to 2 s) and its prediction still counts as current."""
Stamp = tuple[int, int]
"""``(size in bytes, modification time in whole seconds)`` of an image file; ``(-1, 0)``:
unknown (never matches)."""
NO_STAMP: Stamp = (-1, 0)


@dataclass
class SavedPredictions:
    """Predictions as a project keeps them: ``checkpoint_id`` is the SHA-256 of the checkpoint
    file that made them (the embedding cache's checkpoint identity); ``stamps[i]`` is the
    :data:`Stamp` of ``predictions[i].path`` when it was labeled; ``feature_id``: the cache
    key their features were stored under ("" unknown: the embedding map of a reopened
    project reads them with it, without a run)."""

    checkpoint_id: str
    predictions: list[Prediction] = field(default_factory=list)
    stamps: list[Stamp] = field(default_factory=list)
    feature_id: str = ""


# -- predictions ----------------------------------------------------------------------------
def file_stamp(path: Path) -> Stamp:
    """The :data:`Stamp` of a file now (:data:`NO_STAMP` if it cannot be read)."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return NO_STAMP
    return st.st_size, int(st.st_mtime)


def stamp_matches(saved: Stamp, now: Stamp) -> bool:
    """The rule for a saved prediction to count as current: the same size, and a modification
    time within :data:`MTIME_SLACK_S` (copies that keep times, e.g. ``rsync -a``, ``cp -p``,
    zip, keep their labels; an edited or replaced file does not)."""
    return saved[0] >= 0 and saved[0] == now[0] and abs(saved[1] - now[1]) <= MTIME_SLACK_S


def _num(x: float) -> float:
    """A probability as stored: 6 decimals; a non-finite one (a broken model) as 0."""
    v = float(x)
    return round(v, 6) if math.isfinite(v) else 0.0


def predictions_to_dict(saved: SavedPredictions, base: Path) -> dict[str, Any]:
    """The ``predictions`` section, one list per field (compact for 100,000s of images):
    ``path``; ``label`` and the label halves of ``top`` as indexes into ``labels``
    (``label`` null: none); ``top`` as flat ``[label, probability, ...]`` rows; ``error``
    only for the rows that have one (``{row: reason}``); ``size`` and ``mtime`` (seconds)."""
    labels: dict[str, int] = {}

    def ix(name: str) -> int:
        return labels.setdefault(name, len(labels))

    preds = saved.predictions
    stamps = saved.stamps if len(saved.stamps) == len(preds) else [NO_STAMP] * len(preds)
    label_col = [None if p.label is None else ix(p.label) for p in preds]
    top_col = [[v for lab, pr in p.top for v in (ix(lab), _num(pr))] for p in preds]
    return {
        "format": PREDICTIONS_FORMAT,
        "checkpoint_id": saved.checkpoint_id,
        "feature_id": saved.feature_id,
        "labels": list(labels),
        "path": [rel_path(p.path, base) for p in preds],
        "label": label_col,
        "confidence": [_num(p.confidence) for p in preds],
        "margin": [_num(p.margin) for p in preds],
        "status": [str(p.status) for p in preds],
        "top": top_col,
        "error": {str(i): p.error for i, p in enumerate(preds) if p.error},
        "size": [st[0] for st in stamps],
        "mtime": [st[1] for st in stamps],
    }


_STATUSES = frozenset(s.value for s in Status)


def _types(col: list[Any]) -> set[type]:
    return set(map(type, col))


def _numbers(col: list[Any]) -> bool:
    return _types(col) <= {int, float} and all(map(math.isfinite, col))


def _indexes(col: list[Any], n: int, none: bool = False) -> bool:
    ints = [v for v in col if v is not None] if none else col
    return _types(ints) <= {int} and (not ints or (min(ints) >= 0 and max(ints) < n))


def _top_ok(col: list[Any], n: int) -> bool:
    if not (_types(col) <= {list} and all(len(r) % 2 == 0 for r in col)):
        return False
    return (_indexes([x for r in col for x in r[0::2]], n)
            and _numbers([x for r in col for x in r[1::2]]))


def predictions_from_dict(doc: Any, base: str, corrections: dict[Path, str],
                          where: str) -> SavedPredictions:
    """The ``predictions`` section back (see :func:`predictions_to_dict`), checked: UserError
    (one line naming ``where`` and the first bad field) for another format, a missing or
    mistyped column, columns of different lengths or a label index out of range.
    ``corrected`` is set for the paths in ``corrections``. Checks run on whole columns
    (100,000 rows load in about a second, most of it making the paths)."""
    w = f"{where}: predictions"
    if not isinstance(doc, dict):
        raise UserError(f"{w} must be an object, not {type(doc).__name__}")
    if doc.get("format") != PREDICTIONS_FORMAT:
        raise UserError(f"{w}: unknown format {show(doc.get('format'))}")
    ident = typed(doc, "checkpoint_id", str, "text", "", w)
    feature_id = typed(doc, "feature_id", str, "text", "", w)  # "" in older files
    labels = typed(doc, "labels", list, "a list", [], w)
    if not _types(labels) <= {str}:
        raise UserError(f"{w}: 'labels' must be a list of class names")
    paths = typed(doc, "path", list, "a list", None, w)
    n, k = len(paths), len(labels)
    checks: dict[str, tuple[Callable[[list[Any]], bool], str]] = {
        "path": (lambda c: _types(c) <= {str}, "paths"),
        "label": (lambda c: _indexes(c, k, none=True), f"label indexes below {k} or null"),
        "confidence": (_numbers, "finite numbers"), "margin": (_numbers, "finite numbers"),
        "status": (lambda c: _types(c) <= {str} and set(c) <= _STATUSES,
                   "'ok', 'unknown' or 'error'"),
        "top": (lambda c: _top_ok(c, k), f"[label index below {k}, probability, ...] rows"),
        "size": (lambda c: _types(c) <= {int}, "integers"),
        "mtime": (lambda c: _types(c) <= {int}, "integers"),
    }
    cols: dict[str, list[Any]] = {}
    for key, (ok, what) in checks.items():
        col = typed(doc, key, list, "a list", None, w)
        if len(col) != n:
            raise UserError(f"{w}: '{key}' has {len(col)} entries for {n} paths")
        if not ok(col):
            bad = next((v for v in col if not ok([v])), None)
            raise UserError(f"{w}: '{key}' must hold {what}, not {show(bad)}")
        cols[key] = col
    errors = typed(doc, "error", dict, "an object", {}, w)
    for row, reason in errors.items():
        if not (row.isdigit() and int(row) < n and isinstance(reason, str)):
            raise UserError(f"{w}: 'error' must map row numbers to reasons, not {show(row)}")
    status_of = {s.value: s for s in Status}
    corrected = {str(p) for p in corrections}
    preds = []
    for i, (rel, lab, conf, margin, status, top) in enumerate(zip(
            paths, cols["label"], cols["confidence"], cols["margin"], cols["status"],
            cols["top"], strict=True)):
        path = abs_path(rel, base)
        preds.append(Prediction(
            path, None if lab is None else labels[lab], float(conf), float(margin),
            status_of[status], tuple((labels[top[j]], float(top[j + 1]))
                                     for j in range(0, len(top), 2)),
            errors.get(str(i), ""), bool(corrected) and str(path) in corrected))
    return SavedPredictions(ident, preds, list(zip(cols["size"], cols["mtime"], strict=True)),
                            feature_id)
