"""Project files: classes with their example images, the query folder, the user's corrections,
review marks, the labeling settings and the last predictions, as one JSON file (``*.fsproj``).

Qt-free on purpose, so that it can move into the core later. Paths inside the project folder
are stored relative to it (a project folder can be moved or zipped); others stay absolute.
Writes are atomic (temp file + rename). Autosave goes to a recovery file in the user data
directory, never over the user's own file; recent projects are a small JSON list there too.

The predictions section (column by column, with the checkpoint's identity and each image's
size and modification time) is :mod:`.saved_predictions`'; the checked reading of fields and
the relative paths are :mod:`.doc_fields`'.

Nothing is written beside the project but the project file: the embedding cache is the user
cache directory's (or, for projects saved by older versions, the one beside the project file
if it exists, see :func:`cache_path_for`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from fewshot_studio import paths
from fewshot_studio.data.images import ImageLoadError, check_regular_file
from fewshot_studio.engine.api import LabelSettings
from fewshot_studio.errors import UserError
from fewshot_studio.gui.doc_fields import abs_path, rel_path, show, typed
from fewshot_studio.gui.saved_predictions import (
    SavedPredictions,
    predictions_from_dict,
    predictions_to_dict,
)
from fewshot_studio.gui.saved_predictions import file_stamp as file_stamp  # for cli/label.py
from fewshot_studio.io.atomic import atomic_write_text

PROJECT_SUFFIX = ".fsproj"
FORMAT = "fewshot-studio-project/1"
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


@dataclass
class Project:
    """Everything a user set up. ``path`` is the file it was loaded from / saved to (None:
    untitled). ``corrections`` maps absolute query paths to class names; ``reviewed`` maps
    query paths to the verdict the user accepted (label, or None for unknown / error);
    ``predictions``: the last labeling's results (None: never labeled); ``duplicates`` maps
    images marked as near-duplicates to the image kept in their place (exports skip them)."""

    classes: list[ClassSpec] = field(default_factory=list)
    query_folder: Path | None = None
    corrections: dict[Path, str] = field(default_factory=dict)
    checkpoint: str = ""
    settings: LabelSettings = field(default_factory=LabelSettings)
    path: Path | None = None
    reviewed: dict[Path, str | None] = field(default_factory=dict)
    predictions: SavedPredictions | None = None
    duplicates: dict[Path, Path] = field(default_factory=dict)

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
            raise UserError(f"{where}: setting '{k}' must be {what}, not {show(v)}")
        known[k] = float(v) if kind is float else v
    return LabelSettings(**known)


def project_to_dict(project: Project, base: Path) -> dict[str, Any]:
    """The JSON document, with paths relative to ``base`` where they lie inside it."""
    doc: dict[str, Any] = {
        "format": FORMAT,
        "checkpoint": project.checkpoint,
        "settings": _settings_to_dict(project.settings),
        "classes": [{"name": c.name, "color": c.color,
                     "examples": [rel_path(p, base) for p in c.examples]} for c in project.classes],
        "query_folder": rel_path(project.query_folder, base) if project.query_folder else None,
        "corrections": {rel_path(p, base): lab for p, lab in sorted(project.corrections.items())},
        "reviewed": {rel_path(p, base): lab for p, lab in sorted(project.reviewed.items(),
                                                             key=lambda kv: str(kv[0]))},
    }
    if project.duplicates:
        doc["duplicates"] = {rel_path(p, base): rel_path(k, base)
                             for p, k in sorted(project.duplicates.items())}
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


def project_from_dict(doc: dict[str, Any], base: Path, where: str = "project") -> Project:
    """Build a :class:`Project` from a parsed document, checking its structure and types
    (UserError, one line naming ``where`` and the first bad entry). Relative paths resolve
    against ``base``."""
    if not isinstance(doc, dict):
        raise UserError(f"{where}: not a FewShot Studio project (not a JSON object)")
    if doc.get("format") != FORMAT:
        raise UserError(f"{where}: not a FewShot Studio project "
                        f"(format {show(doc.get('format'))})")
    b = str(base)
    classes = []
    for i, c in enumerate(typed(doc, "classes", list, "a list", [], where)):
        if not isinstance(c, dict):
            raise UserError(f"{where}: class {i + 1} must be an object, not {type(c).__name__}")
        name = c.get("name")
        if not isinstance(name, str) or not name.strip():
            raise UserError(f"{where}: class {i + 1} has no name")
        cw = f"{where}: class {name[:40]!r}"
        color = typed(c, "color", (str, type(None)), "text", None, cw)
        examples = typed(c, "examples", list, "a list", [], cw)
        if not all(isinstance(e, str) for e in examples):
            raise UserError(f"{cw}: 'examples' must be a list of paths")
        if any(x.name == name for x in classes):
            raise UserError(f"{where}: class {name[:40]!r} appears twice")
        classes.append(ClassSpec(name, color or PALETTE[i % len(PALETTE)],
                                 [abs_path(e, b) for e in examples]))
    q = typed(doc, "query_folder", (str, type(None)), "a path", None, where)
    corrections = typed(doc, "corrections", dict, "an object", {}, where)
    if not all(isinstance(lab, str) for lab in corrections.values()):
        raise UserError(f"{where}: 'corrections' must map paths to class names")
    reviewed = typed(doc, "reviewed", dict, "an object", {}, where)
    if not all(lab is None or isinstance(lab, str) for lab in reviewed.values()):
        raise UserError(f"{where}: 'reviewed' must map paths to class names or null")
    fixed = {abs_path(p, b): lab for p, lab in corrections.items()}
    dups = typed(doc, "duplicates", dict, "an object", {}, where)
    if not all(isinstance(k, str) for k in dups.values()):
        raise UserError(f"{where}: 'duplicates' must map paths to the paths kept")
    preds = doc.get("predictions")
    return Project(
        classes=classes,
        query_folder=abs_path(q, b) if q else None,
        corrections=fixed,
        checkpoint=typed(doc, "checkpoint", str, "text", "", where),
        settings=_settings_from_dict(typed(doc, "settings", dict, "an object", {}, where),
                                     where),
        reviewed={abs_path(p, b): lab for p, lab in reviewed.items()},
        duplicates={abs_path(p, b): abs_path(k, b) for p, k in dups.items()},
        predictions=None if preds is None else predictions_from_dict(preds, b, fixed, where),
    )


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
