"""Architecture rules: the core never imports Qt, and the GUI never calls the engine on the UI
thread (every session call happens inside a worker)."""

from __future__ import annotations

import ast
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import ClassVar

import pytest

import fewshot_studio
from fewshot_studio.engine.api import BackendInfo, LabelSettings, Prediction, Status
from fewshot_studio.progress import Progress

PKG = Path(fewshot_studio.__file__).parent
QT_ROOTS = {"PySide6", "PyQt5", "PyQt6", "PySide2", "shiboken6", "qtpy", "pytestqt"}
QT_FREE_IN_GUI = {"project_io.py"}  # GUI modules meant to move to the core later


def _imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_no_qt_outside_the_gui() -> None:
    checked, offenders = 0, []
    for py in sorted(PKG.rglob("*.py")):
        rel = py.relative_to(PKG)
        in_gui = rel.parts[0] == "gui"
        if in_gui and rel.name not in QT_FREE_IN_GUI:
            continue
        checked += 1
        if bad := _imported_roots(py) & QT_ROOTS:
            offenders.append(f"{rel}: {sorted(bad)}")
    assert checked > 10  # really looked at the core
    assert not offenders, "Qt imported outside fewshot_studio/gui: " + "; ".join(offenders)


def test_the_ast_check_catches_qt(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text("import os\nfrom PySide6.QtCore import QObject\n")
    assert "PySide6" in _imported_roots(f)


class RecordingSession:
    """Stands in for LabelingSession and records the thread of every call."""

    calls: ClassVar[list[tuple[str, int | None]]] = []

    def __init__(self, checkpoint: str, settings: LabelSettings, cache_path: Path | None) -> None:
        self._rec("__init__")
        self.settings = settings
        self.backend = BackendInfo("torch", "cpu")
        self.class_names: list[str] = []
        self._corr: dict[Path, str] = {}
        self._paths: list[Path] = []

    def _rec(self, name: str) -> None:
        RecordingSession.calls.append((name, threading.get_ident()))

    def prepare(self) -> BackendInfo:
        self._rec("prepare")
        return self.backend

    def set_support(self, classes: Mapping[str, Sequence[Path]]) -> None:
        self._rec("set_support")
        self.class_names = list(classes)

    def support(self) -> dict[str, list[Path]]:
        self._rec("support")
        return {}

    def _preds(self) -> list[Prediction]:
        return [Prediction(p, self._corr.get(p, self.class_names[0]), 0.9, 0.5, Status.OK,
                           ((self.class_names[0], 0.9),), "", p in self._corr)
                for p in self._paths]

    def run(self, paths: Sequence[Path]) -> Iterator[Progress]:
        self._rec("run")
        self._paths = list(paths)
        for i in range(0, len(paths), 2):
            yield Progress(min(i + 2, len(paths)), len(paths), "", payload=self._preds()[i:i + 2])

    def relabel(self) -> list[Prediction]:
        self._rec("relabel")
        return self._preds()

    def predictions(self) -> list[Prediction]:
        self._rec("predictions")
        return self._preds()

    def set_settings(self, settings: LabelSettings) -> list[Prediction]:
        self._rec("set_settings")
        self.settings = settings
        return self._preds()

    def correct(self, paths: Sequence[Path], label: str | None) -> list[Prediction]:
        self._rec("correct")
        for p in paths:
            if label is None:
                self._corr.pop(p, None)
            else:
                self._corr[p] = label
        return self._preds()

    def corrections(self) -> dict[Path, str]:
        self._rec("corrections")
        return dict(self._corr)

    def close(self) -> None:
        self._rec("close")


def test_gui_never_calls_the_engine_on_the_ui_thread(qtbot, tmp_path: Path) -> None:
    pytest.importorskip("pytestqt")
    from _gui_helpers import make_dataset

    from fewshot_studio.gui.main_window import MainWindow
    from fewshot_studio.gui.project_io import ClassSpec, Project

    support, query = make_dataset(tmp_path, n_support=1, n_query=3)
    RecordingSession.calls = []
    win = MainWindow(session_factory=RecordingSession, restore_state=False)
    qtbot.addWidget(win)
    win.show_error = lambda *a: pytest.fail(f"error dialog: {a}")
    win.ask_unsaved = lambda: "discard"
    win.project.apply(Project(classes=[ClassSpec(n, "#123456", ps) for n, ps in support.items()],
                              query_folder=query, checkpoint="fake"))
    qtbot.waitUntil(lambda: win.gallery_model.rowCount() == 9, timeout=5000)
    with qtbot.waitSignal(win.labeling.run_finished, timeout=10_000):
        win.labeling.label()
    first = win.gallery_model.paths()[0]
    win.correct_paths([first], 1)  # correction
    win.labeling.set_threshold(0.7)  # threshold
    win.classes_ctl._add_examples_now("red", [first])  # support change -> relabel
    qtbot.waitUntil(lambda: any(c == "relabel" for c, _ in RecordingSession.calls), timeout=5000)
    win.stack.undo()
    win.labeling.shutdown()
    names = {c for c, _ in RecordingSession.calls}
    assert {"__init__", "prepare", "set_support", "run", "correct", "set_settings",
            "relabel", "close"} <= names
    main = threading.main_thread().ident
    on_main = [c for c, t in RecordingSession.calls if t == main]
    assert not on_main, f"engine called on the UI thread: {on_main}"
    assert win.gallery_model.prediction_for(first) is not None
    win.close()
