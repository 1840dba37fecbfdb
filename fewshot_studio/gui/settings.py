"""App settings: frozen dataclasses for what the user can tune, and the window geometry /
dock state kept in ``QSettings`` (per user, per machine)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PySide6.QtCore import QByteArray, QSettings
from PySide6.QtWidgets import QMainWindow

ORG, APP = "FewShotStudio", "FewShotStudio"


@dataclass(frozen=True)
class UiSettings:
    """``thumbnail_px``: decoded thumbnail side; ``thumbnail_cache``: thumbnails kept in
    memory (LRU); ``autosave_seconds``: recovery-file interval (0: off)."""

    thumbnail_px: int = 192
    thumbnail_cache: int = 1500
    thumbnail_threads: int = 2
    autosave_seconds: int = 60
    max_recent: int = 10


def qsettings() -> QSettings:
    return QSettings(ORG, APP)


def save_window_state(win: QMainWindow, splitter_state: QByteArray | None = None) -> None:
    s = qsettings()
    s.setValue("window/geometry", win.saveGeometry())
    s.setValue("window/state", win.saveState())
    if splitter_state is not None:
        s.setValue("window/splitter", splitter_state)


def restore_window_state(win: QMainWindow) -> QByteArray | None:
    """Restore geometry and toolbar/dock state; returns the saved splitter state, if any."""
    s = qsettings()
    geo = s.value("window/geometry")
    if isinstance(geo, QByteArray) and not geo.isEmpty():
        win.restoreGeometry(geo)
    st = s.value("window/state")
    if isinstance(st, QByteArray) and not st.isEmpty():
        win.restoreState(st)
    sp = s.value("window/splitter")
    return sp if isinstance(sp, QByteArray) and not sp.isEmpty() else None


def last_dir(kind: str) -> Path | None:
    """The folder the user last chose in a file dialog of ``kind`` ("export-csv",
    "project", ...), if it still exists."""
    value = qsettings().value(f"dialogs/{kind}")
    if isinstance(value, str) and value and Path(value).is_dir():
        return Path(value)
    return None


def remember_dir(kind: str, chosen: Path) -> None:
    """Remember the folder of ``chosen`` (a folder, or a file's folder) for dialogs of
    ``kind``."""
    folder = chosen if chosen.is_dir() else chosen.parent
    qsettings().setValue(f"dialogs/{kind}", str(folder))
