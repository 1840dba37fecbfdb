"""Labeling through the GUI with the real engine and a tiny random-init checkpoint: streaming
results, corrections by key press (and undo), threshold, export = the CLI's CSV, and the
project round trip."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

pytest.importorskip("pytestqt")

from _gui_helpers import make_dataset, make_image, tiny_checkpoint
from PySide6.QtCore import QItemSelectionModel, QMimeData, QPointF, Qt
from PySide6.QtGui import QDragEnterEvent, QDropEvent
from PySide6.QtWidgets import QApplication

from fewshot_studio.engine.api import LabelSettings, Status
from fewshot_studio.gui.main_window import MainWindow
from fewshot_studio.gui.models.gallery import Role
from fewshot_studio.gui.project_io import PALETTE, ClassSpec, Project
from fewshot_studio.gui.views.class_card import QUERY_MIME

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # QDragEnterEvent(QPoint)

N_QUERY = 6  # per class


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("gui_label")
    ckpt = tiny_checkpoint(root / "tiny.safetensors")
    support, query = make_dataset(root / "ds", n_support=3, n_query=N_QUERY)
    bad = query / "broken.jpg"
    bad.write_bytes(b"this is not a jpeg")
    return {"ckpt": ckpt, "support": support, "query": query, "bad": bad, "root": root}


def _project(data: dict, threshold: float = 0.0) -> Project:
    return Project(
        classes=[ClassSpec(n, PALETTE[i], list(ps))
                 for i, (n, ps) in enumerate(data["support"].items())],
        query_folder=data["query"], checkpoint=str(data["ckpt"]),
        settings=LabelSettings(unknown_threshold=threshold))


@pytest.fixture
def win(qtbot, data: dict, tmp_path: Path):
    w = MainWindow(restore_state=False)
    errors: list[tuple] = []
    w.show_error = lambda *a: errors.append(a)
    w.errors = errors
    w.ask_unsaved = lambda: "discard"
    qtbot.addWidget(w)
    w.show()
    w.project.apply(_project(data))
    w.labeling.set_cache_path(tmp_path / "cache.sqlite")
    qtbot.waitUntil(lambda: w.gallery_model.rowCount() == 3 * N_QUERY + 1, timeout=10_000)
    yield w
    w.close()


def _label(qtbot, w: MainWindow) -> dict:
    with qtbot.waitSignal(w.labeling.run_finished, timeout=60_000) as sig:
        assert w.labeling.label() is not None
    return sig.args[0]


def _idle(qtbot, w: MainWindow) -> None:
    qtbot.waitUntil(lambda: w.labeling.pool.activeThreadCount() == 0, timeout=20_000)
    qtbot.wait(50)  # let queued result signals land


def _select(w: MainWindow, paths: list[Path]) -> None:
    sel = w.gallery.selectionModel()
    sel.clearSelection()
    for p in paths:
        src = w.gallery_model.index(w.gallery_model.row_of(p))
        ix = w.proxy.mapFromSource(src)
        sel.select(ix, QItemSelectionModel.SelectionFlag.Select)
        sel.setCurrentIndex(ix, QItemSelectionModel.SelectionFlag.NoUpdate)


def test_label_streams_results_off_the_ui_thread(qtbot, win: MainWindow, data: dict) -> None:
    streamed: list[int] = []
    win.labeling.progress.connect(lambda d, t, s: streamed.append(d))
    summary = _label(qtbot, win)
    preds = win.gallery_model.predictions()
    assert len(preds) == 3 * N_QUERY + 1
    assert summary["errors"] == 1 and summary["labeled"] == 3 * N_QUERY
    bad = win.gallery_model.prediction_for(data["bad"].resolve())
    assert bad is not None and bad.status == Status.ERROR and bad.error
    right = sum(p.label == p.path.name.split("_")[0] for p in preds if p.status == Status.OK)
    assert right >= 0.8 * 3 * N_QUERY  # colour classes: even a random Conv4 separates them
    assert streamed and max(streamed) == 3 * N_QUERY + 1
    main = threading.main_thread().ident
    assert win.labeling.workers and all(
        w.thread_ident not in (None, main) for w in win.labeling.workers)
    assert win.toolbar.backend.text().startswith(("ONNX Runtime", "PyTorch"))
    assert not win.errors


def test_correction_by_key_press_and_undo(qtbot, win: MainWindow, data: dict) -> None:
    _label(qtbot, win)
    target = sorted(data["query"].glob("red_*.png"))[0].resolve()
    before = win.gallery_model.prediction_for(target)
    assert before is not None and not before.corrected
    session = win.labeling.host.session
    assert target not in session.support()["blue"]
    other = [p for p in win.gallery_model.predictions() if p.path != target]

    win.gallery.setFocus()
    _select(win, [target])
    qtbot.keyClick(win.gallery, Qt.Key.Key_3)  # third class: blue
    _idle(qtbot, win)
    after = win.gallery_model.prediction_for(target)
    assert after.label == "blue" and after.corrected and after.status == Status.OK
    assert win.labeling.corrections == {target: "blue"}
    assert target in session.support()["blue"]  # joined the support set
    assert session.corrections() == {target: "blue"}
    # everything was relabeled from the cache: the other predictions may move, never to
    # "corrected"
    assert all(not win.gallery_model.prediction_for(p.path).corrected for p in other)
    # the cursor moved on to the next image (file name order); the correction is a review
    shown = [win.proxy.index(r, 0).data(Role.PATH) for r in range(win.proxy.rowCount())]
    assert win.gallery.currentIndex().data(Role.PATH) == shown[shown.index(target) + 1]
    assert win.labeling.reviewed_paths() == {target}

    win.stack.undo()
    _idle(qtbot, win)
    restored = win.gallery_model.prediction_for(target)
    assert not restored.corrected and restored.label == before.label
    assert abs(restored.confidence - before.confidence) < 1e-5
    assert target not in session.support()["blue"] and session.corrections() == {}
    win.stack.redo()
    _idle(qtbot, win)
    assert win.gallery_model.prediction_for(target).label == "blue"

    # dragging tiles onto a class card corrects them too
    dragged = sorted(data["query"].glob("green_*.png"))[:2]
    dragged = [p.resolve() for p in dragged]
    mime = QMimeData()
    mime.setData(QUERY_MIME, "\n".join(map(str, dragged)).encode())
    card = win.class_panel.cards[0]  # "red"
    vp = card.examples.viewport()
    pos, act = vp.rect().center(), Qt.DropAction.CopyAction
    args = (mime, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier)
    QApplication.sendEvent(vp, QDragEnterEvent(pos, act, *args))
    drop = QDropEvent(QPointF(pos), act, *args)
    QApplication.sendEvent(vp, drop)
    assert drop.isAccepted()
    _idle(qtbot, win)
    assert all(win.gallery_model.prediction_for(p).label == "red" for p in dragged)
    assert set(dragged) <= set(session.support()["red"])
    assert win.labeling.corrections == {target: "blue", dragged[0]: "red", dragged[1]: "red"}
    win.stack.undo()  # one undo step for the drop
    _idle(qtbot, win)
    assert win.labeling.corrections == {target: "blue"}
    assert not win.errors


def test_threshold_and_filters(qtbot, win: MainWindow) -> None:
    _label(qtbot, win)
    win.labeling.set_threshold(0.999)
    _idle(qtbot, win)
    preds = win.gallery_model.predictions()
    assert sum(p.status == Status.UNKNOWN for p in preds) == 3 * N_QUERY
    win.review.filter_changed.emit("unknown")
    assert win.proxy.rowCount() == 3 * N_QUERY
    win.review.filter_changed.emit("error")
    assert win.proxy.rowCount() == 1
    win.review.filter_changed.emit("all")
    win.labeling.set_threshold(0.0)
    _idle(qtbot, win)
    win.review.filter_changed.emit("class:red")
    assert 0 < win.proxy.rowCount() < 3 * N_QUERY
    win.review.filter_changed.emit("all")
    win.proxy.set_sort(True)
    confs = [win.proxy.index(r, 0).data(Role.CONFIDENCE) for r in range(win.proxy.rowCount())]
    statuses = [win.proxy.index(r, 0).data(Role.STATUS) for r in range(win.proxy.rowCount())]
    assert statuses[0] == "error"
    assert confs[1:] == sorted(confs[1:])


def test_export_csv_matches_cli(qtbot, win: MainWindow, data: dict, tmp_path: Path) -> None:
    from fewshot_studio.cli import main as cli_main

    # the CLI orders classes by folder name; use the same order so the float sums match
    project = _project(data, threshold=0.5)
    project.classes.sort(key=lambda c: c.name)
    win.project.apply(project)
    win.labeling.set_cache_path(tmp_path / "gui.sqlite")
    qtbot.waitUntil(lambda: win.gallery_model.rowCount() == 3 * N_QUERY + 1, timeout=10_000)
    _label(qtbot, win)
    out = tmp_path / "gui.csv"
    with qtbot.waitSignal(win.export.finished, timeout=10_000):
        win.export.export_file("csv", win.gallery_model.predictions(), out, data["query"])
    cli_out = tmp_path / "cli.csv"
    code = cli_main(["label", "--checkpoint", str(data["ckpt"]),
                     "--support", str(data["root"] / "ds" / "support"),
                     "--query", str(data["query"]), "--out", str(cli_out),
                     "--unknown-threshold", "0.5", "--cache", str(tmp_path / "cli.sqlite")])
    assert code == 0
    assert out.read_text(encoding="utf-8") == cli_out.read_text(encoding="utf-8")
    assert out.read_text().count("\n") == 3 * N_QUERY + 2  # header + rows
    # JSON and copies into class folders go through workers too
    preds = win.gallery_model.predictions()
    with qtbot.waitSignal(win.export.finished, timeout=10_000):
        win.export.export_file("json", preds, tmp_path / "gui.json", data["query"])
    import json

    doc = json.loads((tmp_path / "gui.json").read_text())
    assert len(doc["rows"]) == len(preds)
    with qtbot.waitSignal(win.export.finished, timeout=10_000):
        win.export.copy_to_folders(preds, tmp_path / "sorted")
    copied = sorted(p.relative_to(tmp_path / "sorted").parts[0]
                    for p in (tmp_path / "sorted").rglob("*.png"))
    expect = sorted((p.label or "_unknown") for p in preds if p.status != Status.ERROR)
    assert copied == expect


def test_project_round_trip(qtbot, win: MainWindow, data: dict, tmp_path: Path) -> None:
    _label(qtbot, win)
    target = sorted(data["query"].glob("green_*.png"))[1].resolve()
    extra = make_image(tmp_path / "extra" / "more_red.png", (230, 30, 30), 99)
    win.classes_ctl._add_examples_now("red", [extra])
    _select(win, [target])
    win.correct_selected(0)
    win.labeling.set_threshold(0.25)
    _idle(qtbot, win)
    assert win.project.dirty
    saved = win.project.save(tmp_path / "proj" / "mine")
    assert saved.suffix == ".fsproj" and not win.project.dirty
    snap = win.project.snapshot()

    win.project.new()
    assert win.classes.rowCount() == 0
    win.project.open(saved)
    qtbot.waitUntil(lambda: win.gallery_model.rowCount() == 3 * N_QUERY + 1, timeout=10_000)
    again = win.project.snapshot()
    assert again.classes == snap.classes
    assert again.query_folder == snap.query_folder == data["query"].resolve()
    assert again.corrections == {target: "red"}
    assert again.checkpoint == str(data["ckpt"])
    assert again.settings.unknown_threshold == pytest.approx(0.25)
    assert win.toolbar.threshold.value() == 25
    assert win.project.recent.list()[0] == saved
    _label(qtbot, win)  # the reopened corrections reach the engine
    assert win.gallery_model.prediction_for(target).corrected
    assert win.labeling.host.session.corrections() == {target: "red"}


def test_int8_menu_toggle_runs_the_quantised_network(qtbot, win: MainWindow) -> None:
    """Label > Faster CPU inference (int8): the next run embeds with the int8 ONNX model (the
    toolbar says so) and labels as before; unchecking goes back to fp32."""
    fp32 = _label(qtbot, win)
    assert not win.acts.int8.isChecked() and "int8" not in win.toolbar.backend.toolTip()
    win.acts.int8.trigger()
    _idle(qtbot, win)
    assert win.acts.int8.isChecked() and win.labeling.settings.precision == "int8"
    int8 = _label(qtbot, win)
    assert int8["labeled"] == fp32["labeled"] and int8["errors"] == fp32["errors"] == 1
    assert "onnxruntime" in win.toolbar.backend.toolTip()
    assert "int8" in win.toolbar.backend.toolTip()
    win.acts.int8.trigger()
    _idle(qtbot, win)
    assert not win.acts.int8.isChecked() and win.labeling.settings.precision == "fp32"
    assert not win.errors


def test_tta_menu_toggle_embeds_again_with_averaged_views(qtbot, win: MainWindow) -> None:
    """Label > Test-time augmentation: the next run embeds every image again (its features
    are cached under their own key) and labels as before; the project remembers it."""
    plain = _label(qtbot, win)
    assert not win.acts.tta.isChecked()
    win.acts.tta.trigger()
    _idle(qtbot, win)
    assert win.acts.tta.isChecked() and win.labeling.settings.tta
    assert win.project.snapshot().settings.tta
    embedded = win.labeling.host.session.counters.embedded
    tta = _label(qtbot, win)
    assert win.labeling.host.session.counters.embedded > embedded  # not the cached features
    assert tta["labeled"] == plain["labeled"] and tta["errors"] == plain["errors"] == 1
    win.acts.tta.trigger()
    _idle(qtbot, win)
    assert not win.acts.tta.isChecked() and not win.labeling.settings.tta
    assert not win.errors
