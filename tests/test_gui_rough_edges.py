"""The rough edges a first-time user hits (issue 13, "High 4" and "Medium"): a folder dropped
on the gallery, stale panes and labels, a broken checkpoint, the model-load phase of a run,
the empty state, class import and editing, remembered dialog folders, and ``--demo``.

A fake engine (instant, deterministic) stands in for the model wherever the test is about the
GUI, not about predictions."""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("pytestqt")

from _gui_helpers import FakeSession as BaseFakeSession
from _gui_helpers import drop_urls, make_image, shown_window
from _gui_helpers import label_and_wait as _label
from _gui_helpers import wait_idle as _idle
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QApplication

from fewshot_studio.engine.api import BackendInfo, Prediction, Status
from fewshot_studio.gui import project_io as pio
from fewshot_studio.gui.main_window import MainWindow
from fewshot_studio.progress import Progress

# Qt marks the QPoint constructors of drag events deprecated; they are what Qt itself sends.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

CLASSES = ["apple", "banana"]


class FakeSession(BaseFakeSession):
    """Image i (in sorted order) gets class i % n with confidence 0.6 + 0.01 * (i % 30).
    ``load_s`` is spent in ``prepare`` (the model load), ``batch_s`` per batch of ``batch``
    images in ``run``."""

    load_s = 0.0
    batch_s = 0.0
    batch = 1000

    def prepare(self) -> BackendInfo:
        time.sleep(self.load_s)
        return self.backend

    def guess(self, index: int, p: Path) -> Prediction:
        lab, conf = self.names[index % len(self.names)], 0.6 + 0.01 * (index % 30)
        return Prediction(p, lab, conf, 0.2, Status.OK, ((lab, conf),))

    def run(self, paths: list[Path]) -> Iterator[Progress]:
        self.paths = sorted(paths)
        yield Progress(0, len(paths), "embedding examples")
        for start in range(0, len(paths), self.batch):
            time.sleep(self.batch_s)
            end = min(len(paths), start + self.batch)
            yield Progress(end, len(paths), "labeling", payload=self.predictions()[start:end])


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("rough")
    for i in range(12):
        make_image(root / "query" / f"img_{i:03d}.png", (20 * i, 90, 160), i, size=24)
    support = {n: [make_image(root / "support" / n / f"{n}.png", (90 * k, 60, 90), 100 + k,
                              size=24)] for k, n in enumerate(CLASSES)}
    return {"root": root, "query": root / "query", "support": support}


@pytest.fixture
def win(qtbot):
    w = shown_window(qtbot, session_factory=FakeSession)
    yield w
    w.close()


def _open(qtbot, w: MainWindow, images: dict, checkpoint: str = "fake") -> None:
    w.project.apply(pio.Project(
        classes=[pio.ClassSpec(n, pio.PALETTE[i], images["support"][n])
                 for i, n in enumerate(CLASSES)],
        query_folder=images["query"], checkpoint=checkpoint))
    qtbot.waitUntil(lambda: w.gallery_model.rowCount() == 12, timeout=10_000)





# -- 1. a folder dropped on the gallery --------------------------------------------------------
def test_folder_dropped_on_the_gallery_becomes_the_query_folder(
        qtbot, win: MainWindow, images: dict, tmp_path: Path) -> None:
    view = win.gallery
    assert view.viewport().acceptDrops()  # else the window system refuses a real drag
    assert drop_urls(view.viewport(), [images["query"]])
    qtbot.waitUntil(lambda: win.gallery_model.rowCount() == 12, timeout=10_000)
    assert win.labeling.query_folder == images["query"]
    # image files: the folder that holds them
    other = make_image(tmp_path / "other" / "x.png", (1, 2, 3), 1)
    make_image(tmp_path / "other" / "y.png", (3, 2, 1), 2)
    assert drop_urls(view.viewport(), [other])
    qtbot.waitUntil(lambda: win.gallery_model.rowCount() == 2, timeout=10_000)
    assert win.labeling.query_folder == tmp_path / "other"
    # anything else is refused (a text file; our own tiles)
    (tmp_path / "notes.txt").write_text("no")
    assert not drop_urls(view.viewport(), [tmp_path / "notes.txt"])
    assert win.labeling.query_folder == tmp_path / "other"


# -- 2. stale state --------------------------------------------------------------------------
def test_new_project_clears_the_details_pane(qtbot, win: MainWindow, images: dict) -> None:
    _open(qtbot, win, images)
    _label(qtbot, win)
    win.gallery.setCurrentIndex(win.proxy.index(0, 0))
    assert win.detail.name.text().startswith("img_")
    qtbot.waitUntil(lambda: win.detail.image.pixmap is not None, timeout=5000)
    win.acts.new.trigger()
    assert win.detail.name.text() == "" and win.detail.verdict.text() == ""
    assert win.detail.image.pixmap is None
    assert all(not b.label for b in win.detail.bars)


def test_a_checkpoint_switch_clears_the_old_labels(qtbot, win: MainWindow,
                                                   images: dict) -> None:
    _open(qtbot, win, images)
    _label(qtbot, win)
    first = win.gallery_model.paths()[0]
    win.correct_paths([first], 1)
    _idle(qtbot, win)
    assert win.gallery_model.labeled_count() == 12
    win.labeling.check_checkpoint = lambda name: None  # "other" is no real file
    win.commands.set_checkpoint("other")
    # no label from the old model is left on screen; the correction stays, shown as such
    assert [p.path for p in win.gallery_model.predictions()] == [first]
    assert win.gallery_model.prediction_for(first).corrected
    assert "Model changed" in win.statusBar().currentMessage()
    assert not win.labeling.labeled
    _label(qtbot, win)  # Label brings them back, from the new model
    assert win.labeling.host.session.checkpoint == "other"
    assert win.gallery_model.labeled_count() == 12


def test_a_broken_checkpoint_is_reported_when_chosen(
        qtbot, win: MainWindow, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fewshot_studio.gui.controllers import commands

    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    errors: list[tuple] = []
    win.show_error = lambda *a: errors.append(a)
    monkeypatch.setattr(commands.QFileDialog, "getOpenFileName",
                        staticmethod(lambda *a, **k: (str(bad), "")))
    win.acts.open_checkpoint.trigger()  # File > Open checkpoint…, no Label pressed
    qtbot.waitUntil(lambda: bool(errors), timeout=20_000)
    title, message = errors[0][:2]
    assert title == "Cannot use this checkpoint"
    assert "broken.safetensors" in message and "\n" not in message
    assert win.toolbar.backend.text() == "cannot load"
    assert win.labeling.checkpoint == str(bad)


# -- 3. the model load -------------------------------------------------------------------------
class SlowLoadSession(FakeSession):
    """A second to load the model, then 4 quick batches of 3 images (about 100 img/s)."""

    load_s = 1.0
    batch_s = 0.03
    batch = 3


def test_model_load_shows_a_busy_bar_and_is_left_out_of_rate_and_eta(qtbot, images: dict
                                                                      ) -> None:
    import re

    w = shown_window(qtbot, session_factory=SlowLoadSession)
    try:
        _open(qtbot, w, images)
        texts: list[str] = []
        w.labeling.progress.connect(lambda d, t, text: texts.append(text))
        with qtbot.waitSignal(w.labeling.run_finished, timeout=30_000) as finished:
            w.acts.label.trigger()
            # while the model loads: a moving (busy) bar and words for it, not an empty bar
            qtbot.waitUntil(lambda: "Loading model" in w.progress_text.text(), timeout=5000)
            assert w.progress.isVisible() and w.progress.maximum() == 0
            assert w.progress_text.isVisible()
        rates = [int(m.group(1)) for t in texts if (m := re.search(r"(\d+) img/s", t))]
        assert rates, texts
        # 3 images per 0.03 s: about 100 img/s; counting the 1 s load would give 3 img/s
        assert min(rates) >= 25, texts
        summary = finished.args[0]
        assert summary["load_seconds"] >= 0.9 and summary["seconds"] >= summary["load_seconds"]
        # the summary stays: other status messages come and go, it is still there
        assert w.run_summary.isVisible() and w.run_summary.text().startswith("Labeled 12")
        assert "model load" in w.run_summary.text()
        w.statusBar().showMessage("something else", 50)
        qtbot.wait(150)
        assert w.run_summary.isVisible() and w.run_summary.text().startswith("Labeled 12")
        w.acts.new.trigger()  # the next project: it was about the old one
        assert not w.run_summary.isVisible()
    finally:
        w.close()


# -- 4. the empty state ------------------------------------------------------------------------
def test_label_with_nothing_set_up_gives_guidance_not_an_error(qtbot, win: MainWindow,
                                                               images: dict) -> None:
    from fewshot_studio.gui.actions import menu_text

    infos: list[tuple[str, str]] = []
    win.show_info = lambda title, text: infos.append((title, text))
    win.acts.label.trigger()  # win.show_error fails the test: no error dialog
    assert len(infos) == 1
    title, text = infos[0]
    assert title == "Set up labeling"
    assert "Open query folder" not in text
    # the entries it names are the menu's own
    for act in (win.acts.query_folder, win.acts.import_classes, win.acts.add_class):
        assert menu_text(act) in text, menu_text(act)
    assert text.index("class") < text.index(menu_text(win.acts.query_folder))  # in order
    assert "Label" in text and "Ctrl+L" in text
    # only the missing steps: with classes and images, nothing to say
    _open(qtbot, win, images)
    win.labeling.checkpoint = ""
    win.acts.label.trigger()
    assert "Model" in infos[-1][1] and menu_text(win.acts.query_folder) not in infos[-1][1]
    win.labeling.checkpoint = "fake"
    _label(qtbot, win)
    assert len(infos) == 2


# -- 5. classes --------------------------------------------------------------------------------
def test_file_import_class_folders_makes_one_card_per_sub_folder(
        qtbot, win: MainWindow, images: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    from fewshot_studio.gui import actions
    from fewshot_studio.gui.controllers import commands

    chosen = images["root"] / "support"
    monkeypatch.setattr(commands.QFileDialog, "getExistingDirectory",
                        staticmethod(lambda *a, **k: str(chosen)))
    file_menu = win.menuBar().actions()[0].menu()
    assert win.acts.import_classes in file_menu.actions()
    assert actions.menu_text(win.acts.import_classes) == "Import class folders…"
    win.acts.import_classes.trigger()
    qtbot.waitUntil(lambda: win.classes.names() == CLASSES, timeout=10_000)
    assert [c.name.text() for c in win.class_panel.cards] == CLASSES
    assert win.classes.spec(0).examples == [p.resolve() for p in images["support"]["apple"]]
    win.stack.undo()  # one undo step, as a drop
    assert win.classes.names() == []


def test_plus_class_puts_the_new_name_in_edit_mode(qtbot, win: MainWindow) -> None:
    win.activateWindow()
    qtbot.mouseClick(win.class_panel.add_button, Qt.MouseButton.LeftButton)
    card = win.class_panel.cards[0]
    assert QApplication.focusWidget() is card.name
    assert card.name.selectedText() == "Class 1"
    qtbot.keyClicks(card.name, "cats")  # typing replaces the name
    qtbot.keyClick(card.name, Qt.Key.Key_Return)
    assert win.classes.names() == ["cats"]
    win.acts.add_class.trigger()  # Ctrl+Shift+N does the same
    assert QApplication.focusWidget() is win.class_panel.cards[1].name
    assert win.class_panel.cards[1].name.selectedText() == "Class 2"


def test_card_counts_include_corrected_images(qtbot, win: MainWindow, images: dict) -> None:
    _open(qtbot, win, images)
    _label(qtbot, win)
    paths = win.gallery_model.paths()
    win.correct_paths(paths[:2], 0)
    _idle(qtbot, win)
    apple, banana = win.class_panel.cards
    assert apple.count.text().startswith("1 example + 2 corrected")
    assert banana.count.text().startswith("1 example") and "corrected" not in banana.count.text()
    win.stack.undo()
    _idle(qtbot, win)
    assert "corrected" not in win.class_panel.cards[0].count.text()
    win.stack.redo()
    _idle(qtbot, win)
    win.acts.join_support.trigger()  # corrections no longer join the examples
    assert "corrected" not in win.class_panel.cards[0].count.text()


# -- 6. dialogs start in a sensible folder and remember the last one -------------------------
def test_export_dialogs_start_outside_the_program_and_remember_the_folder(
        qtbot, win: MainWindow, images: dict, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from fewshot_studio import paths as app_paths
    from fewshot_studio.gui.controllers import commands
    from fewshot_studio.gui.settings import qsettings

    qsettings().remove("dialogs")
    asked: list[str] = []
    answer = {"path": ""}

    def save_dialog(parent, title, start, filt):
        asked.append(start)
        return answer["path"], ""

    monkeypatch.setattr(commands.QFileDialog, "getSaveFileName", staticmethod(save_dialog))
    _open(qtbot, win, images)
    _label(qtbot, win)
    win.acts.export_csv.trigger()  # cancelled
    assert Path(asked[-1]) == images["query"] / "labels.csv"  # the query folder
    out = tmp_path / "exports" / "mine.csv"
    out.parent.mkdir()
    answer["path"] = str(out)
    with qtbot.waitSignal(win.export.finished, timeout=10_000):
        win.acts.export_csv.trigger()
    assert out.is_file()
    answer["path"] = ""
    win.acts.export_csv.trigger()
    assert Path(asked[-1]).parent == out.parent  # remembered (QSettings)
    win.acts.export_json.trigger()  # per kind: JSON has its own
    assert Path(asked[-1]).parent == images["query"]
    # the demo's query folder is inside the program: never offered for output
    demo_query = pio.load_demo_project().query_folder
    monkeypatch.setattr(win.labeling, "query_folder", demo_query)
    win.acts.export_json.trigger()
    start = Path(asked[-1]).parent.resolve()
    assert app_paths.resources_dir().resolve() not in (start, *start.parents)


# -- 7. --demo opens labeled -------------------------------------------------------------------
def test_demo_opens_labeled_without_pressing_label(qtbot, monkeypatch: pytest.MonkeyPatch
                                                   ) -> None:
    from PySide6.QtCore import QTimer

    from fewshot_studio.gui import app as gui_app

    seen: dict = {}
    monkeypatch.setattr(gui_app, "MainWindow",
                        lambda **kw: MainWindow(session_factory=FakeSession, **kw))
    deadline = time.monotonic() + 30

    def poll() -> None:
        wins = [w for w in QApplication.topLevelWidgets()
                if isinstance(w, MainWindow) and w.isVisible()]
        if wins:
            w = wins[0]
            w.show_error = lambda *a: seen.setdefault("error", a)
            n = w.gallery_model.rowCount()
            if n and w.gallery_model.labeled_count() == n and not w.labeling.busy:
                seen["labeled"], seen["busy_seen"] = n, seen.get("busy_seen", False)
                w.ask_unsaved = lambda: "discard"
                w.close()
                return
            seen["busy_seen"] = seen.get("busy_seen", False) or w.labeling.busy
        if time.monotonic() > deadline:
            for w in QApplication.topLevelWidgets():
                if isinstance(w, MainWindow):
                    w.ask_unsaved = lambda: "discard"
                    w.close()
            return
        QTimer.singleShot(20, poll)

    QTimer.singleShot(0, poll)
    code = gui_app.run_app(argparse.Namespace(demo=True, screenshot=None, project=None))
    assert code == 0 and "error" not in seen, seen
    assert seen.get("labeled", 0) >= 60  # every demo image, no Label press


def test_an_unreadable_sub_folder_is_reported_not_skipped_silently(
        qtbot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As in the CLI (an error row there): the app names the sub-folder it could not read."""
    from bad_input_helpers import deny_listing

    query = tmp_path / "query"
    for i in range(3):
        make_image(query / f"img_{i:03d}.png", (20 * i, 90, 160), i, size=24)
    locked = query / "locked"
    make_image(locked / "img_100.png", (200, 90, 160), 100, size=24)
    deny_listing(monkeypatch, locked)
    w = shown_window(qtbot, session_factory=FakeSession)
    warnings: list[str] = []
    w.labeling.scan_warning.connect(warnings.append)
    w.labeling.set_query_folder(query)
    qtbot.waitUntil(lambda: bool(warnings), timeout=10_000)
    assert w.gallery_model.rowCount() == 3
    assert str(locked) in warnings[0] and "Permission denied" in warnings[0]
    assert str(locked) in w.statusBar().currentMessage()
    w.close()
