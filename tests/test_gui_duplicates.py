"""Near-duplicates in the app: the Duplicates filter finds them in a worker (with progress) and
shows each group together; Keep one, mark the rest is one undo step that exports skip, saved
with the project; no file is ever touched."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("pytestqt")

from _gui_helpers import label_and_wait, window_with_classes

from fewshot_studio.gui import project_io as pio
from fewshot_studio.gui.controllers import commands
from fewshot_studio.gui.main_window import MainWindow
from fewshot_studio.gui.models.gallery import Role


def texture(seed: int, w: int = 96, h: int = 72) -> Image.Image:
    """A smooth random picture: ``seed`` decides it (different seeds: unrelated pictures)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(np.uint8(rng.integers(0, 255, (9, 12, 3)))).resize(
        (w, h), Image.Resampling.BICUBIC)


@pytest.fixture
def data(tmp_path: Path) -> dict:
    q = tmp_path / "query"
    q.mkdir()
    for i in range(4):
        texture(i).save(q / f"tex{i}.png")
    shutil.copy2(q / "tex0.png", q / "tex0 copy.png")  # an exact copy
    texture(1).resize((64, 48), Image.Resampling.LANCZOS).save(q / "tex1_small.jpg",
                                                               quality=90)  # a near copy
    support = {n: [texture(100 + k).save(tmp_path / f"{n}.png") or tmp_path / f"{n}.png"]
               for k, n in enumerate(("red", "blue"))}
    files = {p: p.read_bytes() for p in q.iterdir()}
    groups = [{q / "tex0 copy.png", q / "tex0.png"}, {q / "tex1.png", q / "tex1_small.jpg"}]
    return {"root": tmp_path, "query": q, "support": support, "files": files,
            "groups": groups}


@pytest.fixture
def win(qtbot, data: dict):
    w = window_with_classes(qtbot, data["support"], data["query"], rows=6)
    w.labeling.set_cache_path(data["root"] / "cache.sqlite")
    yield w
    w.close()


def _shown(w: MainWindow) -> list[Path]:
    return [Path(w.proxy.index(r, 0).data(Role.PATH)) for r in range(w.proxy.rowCount())]


def _find(qtbot, w: MainWindow) -> list:
    """Choose the Duplicates filter in the review bar: it starts the search."""
    progress: list[tuple[int, int]] = []
    w.duplicates.progress.connect(lambda d, t, m: progress.append((d, t)))
    combo = w.review.filter
    with qtbot.waitSignal(w.duplicates.found, timeout=30_000):
        combo.setCurrentIndex(combo.findData("duplicate"))
        combo.activated.emit(combo.currentIndex())
    return progress


def test_the_duplicates_filter_finds_and_groups_them(qtbot, win, data) -> None:
    progress = _find(qtbot, win)
    assert progress and progress[-1] == (6, 6)  # reported from the worker, per batch
    assert win.proxy.filter == "duplicate"
    shown = _shown(win)
    assert len(shown) == 4 and {frozenset(shown[:2]), frozenset(shown[2:])} == {
        frozenset(g) for g in data["groups"]}  # each group together
    win.review.filter.setCurrentIndex(win.review.filter.findData("all"))
    win.review.filter.activated.emit(win.review.filter.currentIndex())
    assert len(_shown(win)) == 6 and _shown(win) == sorted(_shown(win))  # path order again


def test_keep_one_mark_the_rest_is_one_undo_step_and_exports_skip(
        qtbot, win, data, monkeypatch) -> None:
    q = data["query"]
    label_and_wait(qtbot, win)
    _find(qtbot, win)
    small = win.proxy.mapFromSource(win.gallery_model.index(
        win.gallery_model.row_of(q / "tex1_small.jpg")))
    win.gallery.selectionModel().select(small, win.gallery.selectionModel().SelectionFlag
                                        .ClearAndSelect)
    depth = win.stack.count()
    win.acts.keep_one.trigger()
    marks = win.gallery_model.duplicate_marks()
    # group 1: the selected one is kept; group 0 (same size): the first by name
    assert marks == {q / "tex1.png": q / "tex1_small.jpg", q / "tex0.png": q / "tex0 copy.png"}
    assert win.stack.count() == depth + 1
    tile = win.gallery_model.index(win.gallery_model.row_of(q / "tex1.png")).data(Role.TILE)
    assert tile[-1] == "duplicate"
    out = data["root"] / "labels.csv"
    monkeypatch.setattr(commands.QFileDialog, "getSaveFileName",
                        staticmethod(lambda *a, **k: (str(out), "")))
    messages: list[str] = []
    win.export.finished.connect(messages.append)
    with qtbot.waitSignal(win.export.finished, timeout=10_000):
        win.acts.export_csv.trigger()
    with out.open(encoding="utf-8") as f:
        rows = [r["path"] for r in csv.DictReader(f)]
    assert sorted(rows) == ["tex0 copy.png", "tex1_small.jpg", "tex2.png", "tex3.png"]
    assert "left out 2 marked duplicates" in messages[-1]
    assert {p: p.read_bytes() for p in q.iterdir()} == data["files"]  # no file touched
    win.stack.undo()
    assert win.gallery_model.duplicate_marks() == {}
    win.stack.redo()
    assert win.gallery_model.duplicate_marks() == marks


def test_marks_are_saved_with_the_project(qtbot, win, data) -> None:
    _find(qtbot, win)
    win.acts.keep_one.trigger()
    marks = win.gallery_model.duplicate_marks()
    assert len(marks) == 2
    saved = win.project.save(data["root"] / "proj" / "dups")
    assert pio.load_project(saved).duplicates == marks
    win.project.new()
    assert win.gallery_model.duplicate_marks() == {}
    win.project.open(saved)
    assert win.gallery_model.duplicate_marks() == marks
