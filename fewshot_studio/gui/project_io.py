"""Project files: classes with their example images, the query folder, the user's corrections
and the labeling settings, as one JSON file (``*.fsproj``). The embedding cache lives beside it.

Qt-free on purpose, so that it can move into the core later. Paths inside the project folder
are stored relative to it (a project folder can be moved or zipped); others stay absolute.
Writes are atomic (temp file + rename). Autosave goes to a recovery file in the user data
directory, never over the user's own file; recent projects are a small JSON list there too.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from fewshot_studio import paths
from fewshot_studio.engine.api import LabelSettings
from fewshot_studio.errors import UserError
from fewshot_studio.io.atomic import atomic_write_text

PROJECT_SUFFIX = ".fsproj"
FORMAT = "fewshot-studio-project/1"
CACHE_SUFFIX = ".embeddings.sqlite"
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
    untitled). ``corrections`` maps absolute query paths to class names."""

    classes: list[ClassSpec] = field(default_factory=list)
    query_folder: Path | None = None
    corrections: dict[Path, str] = field(default_factory=dict)
    checkpoint: str = ""
    settings: LabelSettings = field(default_factory=LabelSettings)
    path: Path | None = None

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
    try:
        return Path(os.path.relpath(p, base)).as_posix() if p.is_relative_to(base) else str(p)
    except ValueError:  # other drive on Windows
        return str(p)


def _abs(s: str, base: Path) -> Path:
    p = Path(s)
    return p if p.is_absolute() else (base / p).resolve()


def _settings_to_dict(s: LabelSettings) -> dict[str, Any]:
    return asdict(s)


def _settings_from_dict(d: dict[str, Any]) -> LabelSettings:
    known = {f.name for f in fields(LabelSettings)}
    return LabelSettings(**{k: v for k, v in d.items() if k in known})


def project_to_dict(project: Project, base: Path) -> dict[str, Any]:
    """The JSON document, with paths relative to ``base`` where they lie inside it."""
    return {
        "format": FORMAT,
        "checkpoint": project.checkpoint,
        "settings": _settings_to_dict(project.settings),
        "classes": [{"name": c.name, "color": c.color,
                     "examples": [_rel(p, base) for p in c.examples]} for c in project.classes],
        "query_folder": _rel(project.query_folder, base) if project.query_folder else None,
        "corrections": {_rel(p, base): lab for p, lab in sorted(project.corrections.items())},
    }


def project_from_dict(doc: dict[str, Any], base: Path) -> Project:
    if doc.get("format") != FORMAT:
        raise UserError(f"not a FewShot Studio project (format {doc.get('format')!r})")
    classes = [ClassSpec(str(c["name"]), str(c.get("color") or PALETTE[i % len(PALETTE)]),
                         [_abs(e, base) for e in c.get("examples", [])])
               for i, c in enumerate(doc.get("classes", []))]
    q = doc.get("query_folder")
    return Project(
        classes=classes,
        query_folder=_abs(q, base) if q else None,
        corrections={_abs(p, base): str(lab) for p, lab in doc.get("corrections", {}).items()},
        checkpoint=str(doc.get("checkpoint", "")),
        settings=_settings_from_dict(doc.get("settings", {})),
    )


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
        _atomic_write_text(path, json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    except OSError as e:
        raise UserError(f"cannot save the project to {path}: {e.strerror or e}") from e
    return replace(project, path=path)


def load_project(path: Path) -> Project:
    """Read a project file; relative paths resolve against its folder. UserError if it is
    missing or not a project."""
    path = Path(path).resolve()
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise UserError(f"no project file {path}") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read the project {path}: {e}") from e
    if not isinstance(doc, dict):
        raise UserError(f"not a FewShot Studio project: {path}")
    return replace(project_from_dict(doc, path.parent), path=path)


def cache_path_for(project_path: Path | None) -> Path | None:
    """The embedding cache beside a project file (``<name>.embeddings.sqlite``) when its
    folder is writable; None (the engine's default in the user cache dir) otherwise."""
    if project_path is None or not os.access(project_path.parent, os.W_OK):
        return None
    return project_path.with_name(project_path.stem + CACHE_SUFFIX)


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
    doc = json.loads(autosave.read_text(encoding="utf-8"))
    orig = doc.get("original_path")
    return replace(project_from_dict(doc, Path("/")), path=Path(orig) if orig else None)


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
        except (OSError, ValueError):
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
