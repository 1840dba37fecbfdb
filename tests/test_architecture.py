"""Architecture rules: the core never imports Qt, the engine never imports training, there are
no import cycles among ``fewshot_studio`` modules, the GUI never calls the engine on the UI
thread (every session call happens inside a worker), no source file in ``fewshot_studio`` or
``scripts`` is over 500 lines, and no function there is over ruff's mccabe limit (15)."""

from __future__ import annotations

import ast
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
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


def _module_name(path: Path, pkg: Path) -> str:
    """``pkg/a/b.py`` -> ``<pkg name>.a.b``; ``pkg/a/__init__.py`` -> ``<pkg name>.a``."""
    parts = list(path.relative_to(pkg.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _import_source(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The module ``from ... import`` reads from, a relative one resolved against ``module``."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def _import_targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> set[str]:
    """Dotted names ``node`` may import, relative imports resolved against ``module``: the
    module itself and, for ``from m import x``, also ``m.x`` (``x`` may be a sub-module)."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names}
    source = _import_source(node, module, is_package)
    return {source} | {f"{source}.{a.name}" for a in node.names}


def _all_imports(path: Path, pkg: Path) -> set[str]:
    """Every name ``path`` imports, at module level or inside functions and classes."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    module, is_package = _module_name(path, pkg), path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            out |= _import_targets(node, module, is_package)
    return out


def _training_imports(pkg: Path) -> list[str]:
    """``file: module`` for each import of ``<pkg>.training`` under ``<pkg>/engine/``."""
    training = f"{pkg.name}.training"
    return [f"{py.relative_to(pkg)}: {name}"
            for py in sorted((pkg / "engine").rglob("*.py"))
            for name in sorted(_all_imports(py, pkg))
            if name == training or name.startswith(training + ".")]


def test_the_engine_imports_nothing_from_training() -> None:
    assert len(list((PKG / "engine").rglob("*.py"))) > 5  # really looked at the engine
    offenders = _training_imports(PKG)
    assert not offenders, "engine/ imports training/: " + "; ".join(offenders)


def test_the_training_check_catches_function_level_and_relative_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "fewshot_studio"
    (pkg / "engine").mkdir(parents=True)
    (pkg / "engine" / "a.py").write_text(
        "def f():\n    from fewshot_studio.training.calibrate import x\n    return x\n")
    (pkg / "engine" / "b.py").write_text("from ..training import evaluate\n")
    (pkg / "engine" / "c.py").write_text("from fewshot_studio import training\n")
    (pkg / "engine" / "ok.py").write_text("from fewshot_studio.io import checkpoint\n")
    assert {f.partition(":")[0] for f in _training_imports(pkg)} == {
        "engine/a.py", "engine/b.py", "engine/c.py"}


def _is_type_checking(test: ast.expr) -> bool:
    return ast.unparse(test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")


def _module_level_imports(body: list[ast.stmt],
                          type_checking: bool) -> Iterator[ast.Import | ast.ImportFrom]:
    """The imports that run when the module is imported: top-level statements, also inside
    ``if`` / ``try`` / ``with`` blocks and class bodies, never inside functions. ``if
    TYPE_CHECKING:`` blocks only with ``type_checking`` (they never run)."""
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.If):
            if type_checking or not _is_type_checking(node.test):
                yield from _module_level_imports(node.body, type_checking)
            yield from _module_level_imports(node.orelse, type_checking)
        elif isinstance(node, ast.Try):
            for block in (node.body, *(h.body for h in node.handlers), node.orelse,
                          node.finalbody):
                yield from _module_level_imports(block, type_checking)
        elif isinstance(node, ast.With | ast.ClassDef):
            yield from _module_level_imports(node.body, type_checking)


def import_graph(pkg: Path, type_checking: bool = False) -> dict[str, set[str]]:
    """``{module: modules of pkg it imports at module level}`` over every ``.py`` under
    ``pkg``. ``from m import x`` counts as importing ``m.x`` when that is a module, else
    ``m``."""
    files = {_module_name(py, pkg): py for py in sorted(pkg.rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for module, py in files.items():
        tree = ast.parse(py.read_text(encoding="utf-8"), filename=str(py))
        deps: set[str] = set()
        for node in _module_level_imports(tree.body, type_checking):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in files}
                continue
            source = _import_source(node, module, py.name == "__init__.py")
            subs = {f"{source}.{a.name}" for a in node.names} & files.keys()
            deps |= subs or ({source} & files.keys())
        deps.discard(module)
        graph[module] = deps
    return graph


def find_cycle(graph: Mapping[str, set[str]]) -> list[str]:
    """One import cycle ``[a, b, ..., a]`` in ``graph``, or ``[]`` when there is none (a
    depth-first search; modules visited in sorted order, so the answer is stable)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return []


def test_no_import_cycles() -> None:
    graph = import_graph(PKG)
    assert len(graph) > 50 and sum(map(len, graph.values())) > 100  # really built the graph
    cycle = find_cycle(graph)
    assert not cycle, "import cycle among fewshot_studio modules: " + " -> ".join(cycle)


# Typing-only imports (under ``if TYPE_CHECKING:``) never run, so they are left out above; a
# cycle they close would be listed here as known debt, and no new one may appear (none now).
KNOWN_TYPING_CYCLES: list[list[str]] = []


def test_typing_only_imports_close_no_new_cycle() -> None:
    graph = import_graph(PKG, type_checking=True)
    for known in KNOWN_TYPING_CYCLES:  # drop one edge of each known cycle, then look again
        graph[known[0]].discard(known[1])
    cycle = find_cycle(graph)
    assert not cycle, "import cycle (counting TYPE_CHECKING imports): " + " -> ".join(cycle)


def test_the_cycle_check_catches_a_planted_cycle(tmp_path: Path) -> None:
    pkg = tmp_path / "fewshot_studio"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from fewshot_studio.sub import b\n")
    (pkg / "sub" / "b.py").write_text("try:\n    from . import c\nexcept ImportError:\n"
                                      "    pass\n")
    (pkg / "sub" / "c.py").write_text(
        "import os\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
        "    from fewshot_studio import a\ndef f():\n    from fewshot_studio import a\n")
    assert find_cycle(import_graph(pkg)) == []  # typing-only and function-level: no cycle
    assert find_cycle(import_graph(pkg, type_checking=True)) == [
        "fewshot_studio.a", "fewshot_studio.sub.b", "fewshot_studio.sub.c", "fewshot_studio.a"]
    (pkg / "sub" / "c.py").write_text("from ..a import *\n")  # a module-level cycle
    assert find_cycle(import_graph(pkg)) == [
        "fewshot_studio.a", "fewshot_studio.sub.b", "fewshot_studio.sub.c", "fewshot_studio.a"]


class RecordingSession:
    """Stands in for LabelingSession and records the thread of every call."""

    calls: ClassVar[list[tuple[str, int | None]]] = []

    def __init__(self, checkpoint: str, settings: LabelSettings, cache_path: Path | None) -> None:
        self._rec("__init__")
        self.settings = settings
        self.backend = BackendInfo("torch", "cpu")
        self.model_id = "recording:v2"
        self.embedding = SimpleNamespace(feature_id=self._feature_id)
        self.class_names: list[str] = []
        self._corr: dict[Path, str] = {}
        self._paths: list[Path] = []

    def _feature_id(self) -> str:
        self._rec("feature_id")
        return self.model_id

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

    def suspicious_examples(self) -> dict[Path, str]:
        self._rec("suspicious_examples")
        return {}

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


# -- size guards: no source file over 500 lines, no function over ruff's mccabe limit --------
ROOT = PKG.parent
MAX_LINES = 500


def _python_sources() -> list[Path]:
    return sorted([*PKG.rglob("*.py"), *(ROOT / "scripts").rglob("*.py")])


def _max_complexity() -> int:
    """The limit ruff's mccabe check runs with, from pyproject.toml (one place to change it)."""
    import tomllib
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    lint = config["tool"]["ruff"]["lint"]
    assert "C901" in lint["select"], "ruff must run its complexity check (C901)"
    return int(lint["mccabe"]["max-complexity"])


def _too_complex(paths: Sequence[Path]) -> list[str]:
    """``path:line name (complexity)`` of each function over the limit, as ruff reports it."""
    import json
    import subprocess
    import sys
    out = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--select", "C901", "--output-format", "json",
         "--config", f"lint.mccabe.max-complexity={_max_complexity()}", "--no-cache",
         *map(str, paths)], capture_output=True, text=True, cwd=ROOT, check=False)
    assert out.returncode in (0, 1), out.stderr
    return [f"{d['filename']}:{d['location']['row']} {d['message']}"
            for d in json.loads(out.stdout)]


def test_no_source_file_is_over_500_lines() -> None:
    long = {str(p.relative_to(ROOT)): n for p in _python_sources()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"split these files (> {MAX_LINES} lines): {long}"


def test_no_function_is_over_the_complexity_limit() -> None:
    assert _max_complexity() == 15
    assert not _too_complex([PKG, ROOT / "scripts"])


def test_the_complexity_check_catches_a_tangled_function(tmp_path: Path) -> None:
    branches = "\n".join(f"    if x == {i}:\n        return {i}" for i in range(20))
    (tmp_path / "tangled.py").write_text(f"def tangled(x):\n{branches}\n    return -1\n")
    (tmp_path / "plain.py").write_text("def plain(x):\n    return x + 1\n")
    found = _too_complex([tmp_path])
    assert len(found) == 1 and "tangled" in found[0]
