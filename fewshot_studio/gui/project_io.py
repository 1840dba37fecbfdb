"""Project files: classes with their example images, the query folder, the user's corrections,
review marks, the labeling settings and the last predictions, as one JSON file (``*.fsproj``).

Qt-free on purpose, so that it can move into the core later. Paths inside the project folder
are stored relative to it (a project folder can be moved or zipped); others stay absolute.
Writes are atomic (temp file + rename). Autosave goes to a recovery file in the user data
directory, never over the user's own file; recent projects are a small JSON list there too.

Predictions are stored column by column (one list of paths, parallel lists of labels,
confidences...; see :func:`predictions_to_dict`), with the identity (SHA-256) of the
checkpoint that made them and each image's size and modification time. They are shown again
only while all of that still holds (:func:`stamp_matches`); the rest is "not labeled".

Nothing is written beside the project but the project file: the embedding cache is the user
cache directory's (or, for projects saved by older versions, the one beside the project file
if it exists, see :func:`cache_path_for`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from fewshot_studio import paths
from fewshot_studio.data.images import ImageLoadError, check_regular_file
from fewshot_studio.engine.api import LabelSettings, Prediction, Status
from fewshot_studio.errors import UserError
from fewshot_studio.io.atomic import atomic_write_text

PROJECT_SUFFIX = ".fsproj"
FORMAT = "fewshot-studio-project/1"
PREDICTIONS_FORMAT = "fewshot-studio-predictions/1"
MTIME_SLACK_S = 2
"""A file's modification time may differ by this much from the saved one (FAT and zip keep
times to 2 s) and its prediction still counts as current."""
CACHE_SUFFIX = ".embeddings.sqlite"
MAX_PROJECT_BYTES = 200 << 20
"""Project files larger than this (200 MiB) are refused before reading: a project with a
million example and correction paths is about 150 MB."""
# Distinct, readable on white text; class k takes PALETTE[k % len].
PALETTE = ("#2563eb", "#e11d48", "#16a34a", "#d97706", "#7c3aed", "#0891b2", "#db2777",
           "#65a30d", "#ea580c", "#4f46e5")


@dataclass
class ClassSpec:
    """One class: its name, badge colour (``#rrggbb``) and example (support) images."""

    name: str
    color: str
    examples: list[Path] = field(default_factory=list)


Stamp = tuple[int, int]
"""``(size in bytes, modification time in whole seconds)`` of an image file; ``(-1, 0)``:
unknown (never matches)."""
NO_STAMP: Stamp = (-1, 0)


@dataclass
class SavedPredictions:
    """Predictions as a project keeps them: ``checkpoint_id`` is the SHA-256 of the checkpoint
    file that made them (the embedding cache's checkpoint identity); ``stamps[i]`` is the
    :data:`Stamp` of ``predictions[i].path`` when it was labeled."""

    checkpoint_id: str
    predictions: list[Prediction] = field(default_factory=list)
    stamps: list[Stamp] = field(default_factory=list)


@dataclass
class Project:
    """Everything a user set up. ``path`` is the file it was loaded from / saved to (None:
    untitled). ``corrections`` maps absolute query paths to class names; ``reviewed`` maps
    query paths to the verdict the user accepted (label, or None for unknown / error);
    ``predictions``: the last labeling's results (None: never labeled)."""

    classes: list[ClassSpec] = field(default_factory=list)
    query_folder: Path | None = None
    corrections: dict[Path, str] = field(default_factory=dict)
    checkpoint: str = ""
    settings: LabelSettings = field(default_factory=LabelSettings)
    path: Path | None = None
    reviewed: dict[Path, str | None] = field(default_factory=dict)
    predictions: SavedPredictions | None = None

    @property
    def title(self) -> str:
        return self.path.stem if self.path else "Untitled"

    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    def support(self) -> dict[str, list[Path]]:
        """Ordered ``name -> examples`` as the engine takes it (empty classes included)."""
        return {c.name: list(c.examples) for c in self.classes}


def next_color(used: list[str]) -> str:
    """The first palette colour not in ``used`` (cycling when all are taken)."""
    for c in PALETTE:
        if c not in used:
            return c
    return PALETTE[len(used) % len(PALETTE)]


def unique_name(wanted: str, taken: list[str]) -> str:
    """``wanted``, or ``wanted 2``, ``wanted 3``... whichever is not in ``taken``."""
    wanted = wanted.strip() or "Class"
    if wanted not in taken:
        return wanted
    i = 2
    while f"{wanted} {i}" in taken:
        i += 1
    return f"{wanted} {i}"


# -- (de)serialisation -------------------------------------------------------------------
def _rel(p: Path, base: Path) -> str:
    s, b = str(p), str(base)
    prefix = b if b.endswith(os.sep) else b + os.sep
    if s.startswith(prefix):  # the common case, without relpath's cost (300,000 paths)
        return s[len(prefix):].replace(os.sep, "/")
    try:
        return Path(os.path.relpath(p, base)).as_posix() if p.is_relative_to(base) else str(p)
    except ValueError:  # other drive on Windows
        return str(p)


def _abs(s: str, base: str) -> Path:
    """``s`` (absolute, or relative to the folder ``base``) as an absolute, normalised path.
    String work only, no system call: loading 300,000 paths must not stat them all."""
    return Path(os.path.normpath(os.path.join(base, s)))


def _settings_to_dict(s: LabelSettings) -> dict[str, Any]:
    return asdict(s)


def _settings_from_dict(d: dict[str, Any], where: str = "project") -> LabelSettings:
    """The rule: unknown keys are ignored (a newer version's settings); a known key must hold
    a value of its default's type (an integer is accepted for a number; numbers must be
    finite), else UserError naming the key. Values are checked by the engine when it runs."""
    kinds = {f.name: type(f.default) for f in fields(LabelSettings)}
    known: dict[str, Any] = {}
    for k, v in d.items():
        kind = kinds.get(k)
        if kind is None:
            continue
        ok = {bool: isinstance(v, bool), str: isinstance(v, str),
              int: isinstance(v, int) and not isinstance(v, bool),
              float: isinstance(v, (int, float)) and not isinstance(v, bool)
              and math.isfinite(v)}.get(kind, False)
        if not ok:
            what = {bool: "true or false", str: "text", int: "an integer",
                    float: "a finite number"}.get(kind, kind.__name__)
            raise UserError(f"{where}: setting '{k}' must be {what}, not {_show(v)}")
        known[k] = float(v) if kind is float else v
    return LabelSettings(**known)


def _show(v: object) -> str:
    """A short one-line repr of an untrusted value for a message."""
    text = " ".join(repr(v).split())
    return text if len(text) <= 40 else text[:37] + "..."


def project_to_dict(project: Project, base: Path) -> dict[str, Any]:
    """The JSON document, with paths relative to ``base`` where they lie inside it."""
    doc: dict[str, Any] = {
        "format": FORMAT,
        "checkpoint": project.checkpoint,
        "settings": _settings_to_dict(project.settings),
        "classes": [{"name": c.name, "color": c.color,
                     "examples": [_rel(p, base) for p in c.examples]} for c in project.classes],
        "query_folder": _rel(project.query_folder, base) if project.query_folder else None,
        "corrections": {_rel(p, base): lab for p, lab in sorted(project.corrections.items())},
        "reviewed": {_rel(p, base): lab for p, lab in sorted(project.reviewed.items(),
                                                             key=lambda kv: str(kv[0]))},
    }
    if project.predictions is not None:
        doc["predictions"] = predictions_to_dict(project.predictions, base)
    return doc


def dumps_project(doc: dict[str, Any]) -> str:
    """The document as text: indented, except that each column of ``predictions`` is one
    line (a 100,000-image project stays a few MB and quick to read)."""
    doc = dict(doc)
    preds = doc.pop("predictions", None)
    text = json.dumps(doc, indent=2, ensure_ascii=False)
    if preds is None:
        return text + "\n"
    cols = ",\n".join(f"    {json.dumps(k)}: "
                      f"{json.dumps(v, ensure_ascii=False, separators=(',', ':'))}"
                      for k, v in preds.items())
    return text[:-2] + ',\n  "predictions": {\n' + cols + "\n  }\n}\n"


def _typed(doc: dict[str, Any], key: str, kind: type | tuple[type, ...], what: str,
           default: Any, where: str) -> Any:
    """``doc[key]`` (``default`` when absent) checked to be ``kind``: UserError otherwise."""
    v = doc.get(key, default)
    if not isinstance(v, kind):
        raise UserError(f"{where}: '{key}' must be {what}, not {type(v).__name__}")
    return v


def project_from_dict(doc: dict[str, Any], base: Path, where: str = "project") -> Project:
    """Build a :class:`Project` from a parsed document, checking its structure and types
    (UserError, one line naming ``where`` and the first bad entry). Relative paths resolve
    against ``base``."""
    if not isinstance(doc, dict):
        raise UserError(f"{where}: not a FewShot Studio project (not a JSON object)")
    if doc.get("format") != FORMAT:
        raise UserError(f"{where}: not a FewShot Studio project "
                        f"(format {_show(doc.get('format'))})")
    b = str(base)
    classes = []
    for i, c in enumerate(_typed(doc, "classes", list, "a list", [], where)):
        if not isinstance(c, dict):
            raise UserError(f"{where}: class {i + 1} must be an object, not {type(c).__name__}")
        name = c.get("name")
        if not isinstance(name, str) or not name.strip():
            raise UserError(f"{where}: class {i + 1} has no name")
        cw = f"{where}: class {name[:40]!r}"
        color = _typed(c, "color", (str, type(None)), "text", None, cw)
        examples = _typed(c, "examples", list, "a list", [], cw)
        if not all(isinstance(e, str) for e in examples):
            raise UserError(f"{cw}: 'examples' must be a list of paths")
        if any(x.name == name for x in classes):
            raise UserError(f"{where}: class {name[:40]!r} appears twice")
        classes.append(ClassSpec(name, color or PALETTE[i % len(PALETTE)],
                                 [_abs(e, b) for e in examples]))
    q = _typed(doc, "query_folder", (str, type(None)), "a path", None, where)
    corrections = _typed(doc, "corrections", dict, "an object", {}, where)
    if not all(isinstance(lab, str) for lab in corrections.values()):
        raise UserError(f"{where}: 'corrections' must map paths to class names")
    reviewed = _typed(doc, "reviewed", dict, "an object", {}, where)
    if not all(lab is None or isinstance(lab, str) for lab in reviewed.values()):
        raise UserError(f"{where}: 'reviewed' must map paths to class names or null")
    fixed = {_abs(p, b): lab for p, lab in corrections.items()}
    preds = doc.get("predictions")
    return Project(
        classes=classes,
        query_folder=_abs(q, b) if q else None,
        corrections=fixed,
        checkpoint=_typed(doc, "checkpoint", str, "text", "", where),
        settings=_settings_from_dict(_typed(doc, "settings", dict, "an object", {}, where),
                                     where),
        reviewed={_abs(p, b): lab for p, lab in reviewed.items()},
        predictions=None if preds is None else predictions_from_dict(preds, b, fixed, where),
    )


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
        "labels": list(labels),
        "path": [_rel(p.path, base) for p in preds],
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
        raise UserError(f"{w}: unknown format {_show(doc.get('format'))}")
    ident = _typed(doc, "checkpoint_id", str, "text", "", w)
    labels = _typed(doc, "labels", list, "a list", [], w)
    if not _types(labels) <= {str}:
        raise UserError(f"{w}: 'labels' must be a list of class names")
    paths = _typed(doc, "path", list, "a list", None, w)
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
        col = _typed(doc, key, list, "a list", None, w)
        if len(col) != n:
            raise UserError(f"{w}: '{key}' has {len(col)} entries for {n} paths")
        if not ok(col):
            bad = next((v for v in col if not ok([v])), None)
            raise UserError(f"{w}: '{key}' must hold {what}, not {_show(bad)}")
        cols[key] = col
    errors = _typed(doc, "error", dict, "an object", {}, w)
    for row, reason in errors.items():
        if not (row.isdigit() and int(row) < n and isinstance(reason, str)):
            raise UserError(f"{w}: 'error' must map row numbers to reasons, not {_show(row)}")
    status_of = {s.value: s for s in Status}
    corrected = {str(p) for p in corrections}
    preds = []
    for i, (rel, lab, conf, margin, status, top) in enumerate(zip(
            paths, cols["label"], cols["confidence"], cols["margin"], cols["status"],
            cols["top"], strict=True)):
        path = _abs(rel, base)
        preds.append(Prediction(
            path, None if lab is None else labels[lab], float(conf), float(margin),
            status_of[status], tuple((labels[top[j]], float(top[j + 1]))
                                     for j in range(0, len(top), 2)),
            errors.get(str(i), ""), bool(corrected) and str(path) in corrected))
    return SavedPredictions(ident, preds, list(zip(cols["size"], cols["mtime"], strict=True)))



def _read_document(path: Path) -> Any:
    """The parsed JSON of a project (or recovery) file: a regular file of at most
    :data:`MAX_PROJECT_BYTES`, checked before reading. UserError otherwise."""
    try:
        check_regular_file(path, MAX_PROJECT_BYTES)
    except ImageLoadError as e:
        if str(e) == "file not found":
            raise UserError(f"no project file {path}") from None
        raise UserError(f"cannot read the project {path}: {e}") from None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read the project {path}: {' '.join(str(e).split())}") from e
    except RecursionError:
        raise UserError(f"cannot read the project {path}: nested too deeply") from None


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


def save_project(project: Project, path: Path) -> Project:
    """Write ``project`` to ``path`` (``.fsproj`` appended if missing) atomically; returns the
    project with ``path`` set. Raises UserError when the file cannot be written."""
    path = Path(path)
    if path.suffix != PROJECT_SUFFIX:
        path = path.with_name(path.name + PROJECT_SUFFIX)
    path = path.resolve()
    doc = project_to_dict(project, path.parent)
    try:
        _atomic_write_text(path, dumps_project(doc))
    except OSError as e:
        raise UserError(f"cannot save the project to {path}: {e.strerror or e}") from e
    return replace(project, path=path)


def load_project(path: Path) -> Project:
    """Read a project file; relative paths resolve against its folder. UserError (one line
    naming the file) if it is missing, too large, not a project, or of the wrong structure."""
    path = Path(path).resolve()
    doc = _read_document(path)
    return replace(project_from_dict(doc, path.parent, f"project {path}"), path=path)


def cache_path_for(project_path: Path | None) -> Path | None:
    """The embedding cache a project uses: the one beside the project file
    (``<name>.embeddings.sqlite``, which earlier versions wrote) if it exists, so that its
    features are used; else None, the engine's default in the user cache directory. Nothing
    here creates or moves a cache: saving a project never touches it."""
    if project_path is None:
        return None
    legacy = project_path.with_name(project_path.stem + CACHE_SUFFIX)
    return legacy if legacy.is_file() else None


def demo_project_path() -> Path:
    return paths.resources_dir() / "demo" / f"demo{PROJECT_SUFFIX}"


def load_demo_project() -> Project:
    """The bundled demo, detached from its (possibly read-only) file: Save asks where."""
    return replace(load_project(demo_project_path()), path=None)


# -- autosave & recent projects -----------------------------------------------------------
def autosave_path(project_path: Path | None) -> Path:
    """The recovery file for a project (one per project path; one for untitled work)."""
    key = hashlib.sha1(str(project_path).encode()).hexdigest()[:12] if project_path else "untitled"
    return paths.user_data_dir() / "autosave" / f"{key}{PROJECT_SUFFIX}"


def write_autosave(project: Project) -> Path:
    """Save a recovery copy (absolute paths; the original file is untouched)."""
    target = autosave_path(project.path)
    doc = project_to_dict(project, Path("/nonexistent-base"))
    doc["original_path"] = str(project.path) if project.path else None
    _atomic_write_text(target, json.dumps(doc, indent=1, ensure_ascii=False))
    return target


def find_autosave(project_path: Path | None) -> Path | None:
    """A recovery file newer than the project file, if there is one."""
    a = autosave_path(project_path)
    if not a.is_file():
        return None
    if project_path is not None and project_path.is_file() \
            and a.stat().st_mtime <= project_path.stat().st_mtime:
        return None
    return a


def load_autosave(autosave: Path) -> Project:
    """A recovery file, checked like a project file (UserError)."""
    doc = _read_document(autosave)
    project = project_from_dict(doc, Path("/"), f"recovery file {autosave}")
    orig = doc.get("original_path")
    return replace(project, path=Path(orig) if isinstance(orig, str) and orig else None)


def discard_autosave(project_path: Path | None) -> None:
    autosave_path(project_path).unlink(missing_ok=True)


class RecentProjects:
    """Most-recent-first list of project files, kept in ``recent.json`` in the data dir."""

    def __init__(self, store: Path | None = None, limit: int = 10) -> None:
        self.store = store or paths.user_data_dir() / "recent.json"
        self.limit = limit

    def list(self) -> list[Path]:
        try:
            items = json.loads(self.store.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            return []
        if not isinstance(items, list):
            return []
        return [Path(p) for p in items if isinstance(p, str) and Path(p).is_file()]

    def add(self, path: Path) -> list[Path]:
        path = Path(path).resolve()
        items = [path] + [p for p in self.list() if p != path]
        items = items[: self.limit]
        with contextlib.suppress(OSError):  # a read-only data dir must not break a save
            _atomic_write_text(self.store, json.dumps([str(p) for p in items], indent=1))
        return items

    def clear(self) -> None:
        self.store.unlink(missing_ok=True)
