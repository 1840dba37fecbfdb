"""The keyboard-first review loop, driven by real key events on the gallery: 1-9 corrects and
moves the cursor on to the next image (not to where the corrected tile went), Enter / Space
accept (reviewed, undoable), N / Shift+N jump to the next / previous unreviewed image, the
"Unreviewed" filter and the reviewed count, focus in the gallery from the start, and a model
box that ignores the keys that used to switch the checkpoint or open a file dialog.

A fake engine (deterministic confidences, instant) stands in for the model: these tests are
about the GUI's review state and cursor, not about predictions."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("pytestqt")

from _gui_helpers import FakeSession as BaseFakeSession
from _gui_helpers import label_and_wait as _label
from _gui_helpers import make_image, shown_window
from _gui_helpers import wait_idle as _idle
from PySide6.QtCore import QItemSelectionModel, QPoint, QPointF, Qt
from PySide6.QtGui import QImage, QPainter, QWheelEvent
from PySide6.QtWidgets import QApplication, QLineEdit

from fewshot_studio.engine.api import Prediction, Status
from fewshot_studio.gui import actions
from fewshot_studio.gui import project_io as pio
from fewshot_studio.gui.controllers import commands
from fewshot_studio.gui.main_window import MainWindow
from fewshot_studio.gui.models.gallery import Role

N = 30
CLASSES = ["apple", "banana", "cherry"]
DOCS = Path(__file__).resolve().parents[1] / "docs" / "gui.md"


def conf_of(path: Path) -> float:
    """img_007.png -> a confidence; a permutation, so confidence order != name order."""
    i = int(path.stem.split("_")[1])
    return round(0.05 + 0.9 * ((i * 7) % N) / N, 4)


class FakeSession(BaseFakeSession):
    """Image i gets class i % 3 with ``conf_of`` confidence (unknown below the threshold)."""

    def guess(self, index: int, p: Path) -> Prediction:
        conf = conf_of(p)
        lab = self.names[int(p.stem.split("_")[1]) % len(self.names)]
        if conf < self.settings.unknown_threshold:
            return Prediction(p, None, conf, 0.1, Status.UNKNOWN, ((lab, conf),))
        return Prediction(p, lab, conf, 0.1, Status.OK, ((lab, conf),))


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("review")
    query = [make_image(root / "query" / f"img_{i:03d}.png", (20 * (i % 10), 90, 160), i,
                        size=24) for i in range(N)]
    support = {n: [make_image(root / "support" / f"{n}.png", (40 * k, 60, 90), 100 + k,
                              size=24)] for k, n in enumerate(CLASSES)}
    return {"query": root / "query", "support": support,
            "by_conf": sorted((p.resolve() for p in query), key=conf_of)}


def _open(qtbot, w: MainWindow, images: dict) -> None:
    w.project.apply(pio.Project(
        classes=[pio.ClassSpec(n, pio.PALETTE[i], images["support"][n])
                 for i, n in enumerate(CLASSES)],
        query_folder=images["query"], checkpoint="fake"))
    qtbot.waitUntil(lambda: w.gallery_model.rowCount() == N, timeout=10_000)


@pytest.fixture
def raw_win(qtbot):
    """The window, shown, nothing loaded."""
    w = shown_window(qtbot, session_factory=FakeSession)
    yield w
    w.close()


@pytest.fixture
def win(qtbot, raw_win: MainWindow, images: dict) -> MainWindow:
    """Sorted least confident first (chosen in the review bar) and labeled."""
    _open(qtbot, raw_win, images)
    sort = raw_win.review.sort
    sort.setCurrentIndex(sort.findData(True))
    sort.activated.emit(sort.currentIndex())
    _label(qtbot, raw_win)
    return raw_win




def _shown(w: MainWindow) -> list[Path]:
    return [w.proxy.index(r, 0).data(Role.PATH) for r in range(w.proxy.rowCount())]


def _current(w: MainWindow) -> Path | None:
    ix = w.gallery.currentIndex()
    return ix.data(Role.PATH) if ix.isValid() else None


def _selected(w: MainWindow) -> list[Path]:
    return w.gallery.selected_paths()


def _visible(w: MainWindow) -> bool:
    rect = w.gallery.visualRect(w.gallery.currentIndex())
    return rect.isValid() and w.gallery.viewport().rect().contains(rect)


def _select(w: MainWindow, path: Path) -> None:
    ix = w.proxy.mapFromSource(w.gallery_model.index(w.gallery_model.row_of(path)))
    w.gallery.selectionModel().setCurrentIndex(
        ix, QItemSelectionModel.SelectionFlag.ClearAndSelect)


def _choose_filter(w: MainWindow, key: str) -> None:
    f = w.review.filter
    i = f.findData(key)
    assert i >= 0, f"no filter {key!r}"
    f.setCurrentIndex(i)
    f.activated.emit(i)


# -- 1-9: correct, then the next image ---------------------------------------------------------
def test_number_key_moves_the_cursor_to_the_next_image_not_the_moved_tile(
        qtbot, win: MainWindow, images: dict) -> None:
    order = images["by_conf"]
    assert _shown(win) == order  # least confident first
    _select(win, order[0])
    for k in range(12):  # far enough that the cursor has to scroll
        assert _current(win) == order[k]
        qtbot.keyClick(win.gallery, Qt.Key.Key_1 + (k % 3))
        _idle(qtbot, win)
        corrected = win.gallery_model.prediction_for(order[k])
        assert corrected.corrected and corrected.label == CLASSES[k % 3]
        assert set(_shown(win)[N - 1 - k:]) == set(order[:k + 1])  # the corrected tiles
        assert _shown(win)[:N - 1 - k] == order[k + 1:]  # went to the bottom...
        assert _current(win) == order[k + 1]  # ...the cursor went on to the next image
        assert _selected(win) == [order[k + 1]]
        assert _visible(win), f"the cursor's tile is scrolled out of view after {k + 1}"
    assert win.labeling.reviewed_paths() == set(order[:12])  # a correction is a review
    # multi-selection (rows 0 and 2): the cursor goes to the first unselected image after
    # the last of them
    assert _shown(win)[:4] == order[12:16]
    qtbot.keyClick(win.gallery, Qt.Key.Key_Right, Qt.KeyboardModifier.ControlModifier)
    qtbot.keyClick(win.gallery, Qt.Key.Key_Right, Qt.KeyboardModifier.ControlModifier)
    qtbot.keyClick(win.gallery, Qt.Key.Key_Space, Qt.KeyboardModifier.ControlModifier)
    assert _selected(win) == [order[12], order[14]]
    qtbot.keyClick(win.gallery, Qt.Key.Key_2)
    _idle(qtbot, win)
    assert win.labeling.corrections[order[12]] == win.labeling.corrections[order[14]] == "banana"
    assert _current(win) == order[15] and _selected(win) == [order[15]]


def test_undo_of_a_correction_restores_the_review_state(qtbot, win: MainWindow,
                                                        images: dict) -> None:
    first = images["by_conf"][0]
    qtbot.keyClick(win.gallery, Qt.Key.Key_3)
    _idle(qtbot, win)
    assert win.labeling.reviewed_paths() == {first}
    win.stack.undo()
    _idle(qtbot, win)
    assert win.labeling.corrections == {} and win.labeling.reviewed_paths() == set()
    assert not win.gallery_model.prediction_for(first).corrected


# -- Enter / Space: accept -------------------------------------------------------------------
def test_enter_and_space_accept_mark_reviewed_advance_and_undo(
        qtbot, win: MainWindow, images: dict) -> None:
    order = images["by_conf"]
    before = {p.path: p for p in win.gallery_model.predictions()}
    qtbot.keyClick(win.gallery, Qt.Key.Key_Return)
    assert _current(win) == order[1] and _selected(win) == [order[1]]
    qtbot.keyClick(win.gallery, Qt.Key.Key_Space)
    qtbot.keyClick(win.gallery, Qt.Key.Key_Enter)  # the keypad's Enter too
    assert _current(win) == order[3]
    assert win.labeling.reviewed_paths() == set(order[:3])
    assert win.labeling.review_marks() == {p: before[p].label for p in order[:3]}
    assert [win.proxy.index(r, 0).data(Role.REVIEWED) for r in range(4)] == [
        True, True, True, False]
    assert _shown(win) == order  # accepting changes no prediction and moves no tile
    assert win.labeling.corrections == {}
    assert {p.path: p for p in win.gallery_model.predictions()} == before
    assert win.review_count.isVisible()
    assert win.review_count.text() == f"reviewed 3 / {N}"
    assert win.project.dirty
    win.stack.undo()
    assert win.labeling.reviewed_paths() == set(order[:2])
    assert win.review_count.text() == f"reviewed 2 / {N}"
    win.stack.redo()
    assert win.labeling.reviewed_paths() == set(order[:3])
    # the review state has a clean API (for saving it in a project later)
    win.labeling.set_reviewed({order[5]: before[order[5]].label})
    assert win.labeling.reviewed_paths() == {order[5]}


def test_an_accepted_verdict_that_a_relabel_changes_is_unreviewed_again(
        qtbot, win: MainWindow, images: dict) -> None:
    order = images["by_conf"]
    assert win.gallery_model.prediction_for(order[0]).status == Status.UNKNOWN  # 0.05 < 0.55
    qtbot.keyClick(win.gallery, Qt.Key.Key_Return)  # accepts "unknown" for order[0]
    assert win.labeling.review_marks() == {order[0]: None}
    assert win.labeling.reviewed_paths() == {order[0]}
    win.labeling.set_threshold(0.0)  # now shown as a class: not what was accepted
    _idle(qtbot, win)
    assert win.gallery_model.prediction_for(order[0]).label == "apple"
    assert win.labeling.reviewed_paths() == set()
    assert win.review_count.text() == f"reviewed 0 / {N}"
    win.labeling.set_threshold(0.55)
    _idle(qtbot, win)
    assert win.labeling.reviewed_paths() == {order[0]}


# -- N: next unreviewed ------------------------------------------------------------------------
def test_n_jumps_to_the_next_unreviewed_image_and_wraps(qtbot, win: MainWindow,
                                                         images: dict) -> None:
    order = images["by_conf"]
    for _ in range(3):
        qtbot.keyClick(win.gallery, Qt.Key.Key_Return)  # order[0..2] reviewed
    _select(win, order[0])
    qtbot.keyClick(win.gallery, Qt.Key.Key_N)
    assert _current(win) == order[3] and _selected(win) == [order[3]]
    _select(win, order[N - 1])
    qtbot.keyClick(win.gallery, Qt.Key.Key_N)  # wraps over the reviewed ones at the top
    assert _current(win) == order[3]
    qtbot.keyClick(win.gallery, Qt.Key.Key_N, Qt.KeyboardModifier.ShiftModifier)
    assert _current(win) == order[N - 1]  # Shift+N: backwards, wrapping
    assert _visible(win)
    win.labeling.set_reviewed({p.path: p.label for p in win.gallery_model.predictions()})
    qtbot.keyClick(win.gallery, Qt.Key.Key_N)
    assert _current(win) == order[N - 1]  # nothing left: the cursor stays
    assert "reviewed" in win.statusBar().currentMessage()


# -- the Unreviewed filter and the count -------------------------------------------------------
def test_unreviewed_filter_shows_what_is_left_and_the_count(qtbot, win: MainWindow,
                                                            images: dict) -> None:
    order = images["by_conf"]
    assert win.review_count.text() == f"reviewed 0 / {N}"
    _choose_filter(win, "unreviewed")
    assert win.proxy.rowCount() == N
    _select(win, order[0])
    qtbot.keyClick(win.gallery, Qt.Key.Key_Return)
    assert win.proxy.rowCount() == N - 1 and order[0] not in _shown(win)
    assert _current(win) == order[1] and _selected(win) == [order[1]]
    qtbot.keyClick(win.gallery, Qt.Key.Key_2)  # a correction leaves the filter too
    _idle(qtbot, win)
    assert win.proxy.rowCount() == N - 2 and order[1] not in _shown(win)
    assert _current(win) == order[2]
    assert win.review_count.text() == f"reviewed 2 / {N}"
    assert "showing 28" in win.review.counts.text_full()
    win.stack.undo()
    win.stack.undo()
    _idle(qtbot, win)
    assert win.review_count.text() == f"reviewed 0 / {N}"
    assert win.proxy.rowCount() == N  # undone: both are back in the filter


# -- focus ---------------------------------------------------------------------------------
def test_focus_starts_in_the_gallery_and_keys_work_without_a_click(
        qtbot, raw_win: MainWindow, images: dict) -> None:
    w = raw_win
    assert w.focusWidget() is w.gallery  # on show
    w.toolbar.checkpoint.setFocus()  # e.g. the user clicked it...
    _open(qtbot, w, images)
    assert w.focusWidget() is w.gallery  # ...a project opened: the gallery again
    w.toolbar.checkpoint.setFocus()
    _label(qtbot, w)
    assert w.focusWidget() is w.gallery  # labeling finished
    first = w.proxy.index(0, 0).data(Role.PATH)
    assert _selected(w) == [first]  # a tile to act on, without a click
    qtbot.keyClick(w.focusWidget(), Qt.Key.Key_2)
    _idle(qtbot, w)
    assert w.labeling.corrections == {first: "banana"}
    # the toolbar and review bar take the keyboard only when clicked
    for widget in (w.toolbar.checkpoint, w.toolbar.threshold, w.review.filter, w.review.sort):
        assert widget.focusPolicy() == Qt.FocusPolicy.ClickFocus, widget.objectName()
    assert w.toolbar.widgetForAction(w.acts.label).focusPolicy() == Qt.FocusPolicy.NoFocus
    # a class name being typed keeps the keyboard when a run ends
    edit = w.class_panel.findChild(QLineEdit, "className")
    edit.setFocus()
    _label(qtbot, w)
    assert w.focusWidget() is edit


def test_the_model_box_ignores_arrows_end_and_the_wheel(
        qtbot, raw_win: MainWindow, monkeypatch: pytest.MonkeyPatch) -> None:
    w = raw_win
    opened: list[str] = []
    monkeypatch.setattr(commands.QFileDialog, "getOpenFileName",
                        lambda *a, **k: (opened.append("dialog"), ("", ""))[1])
    combo = w.toolbar.checkpoint
    combo.setCurrentIndex(0)
    before, chosen = combo.currentIndex(), []
    w.toolbar.checkpoint_chosen.connect(chosen.append)
    w.toolbar.open_checkpoint_requested.connect(lambda: opened.append("requested"))
    combo.setFocus()
    for key in (Qt.Key.Key_Down, Qt.Key.Key_End, Qt.Key.Key_PageDown, Qt.Key.Key_Up,
                Qt.Key.Key_Home, Qt.Key.Key_N):
        qtbot.keyClick(combo, key)
    pos = QPointF(combo.rect().center())
    wheel = QWheelEvent(pos, combo.mapToGlobal(pos), QPoint(0, 0), QPoint(0, -120),
                        Qt.MouseButton.NoButton, Qt.KeyboardModifier.NoModifier,
                        Qt.ScrollPhase.NoScrollPhase, False)
    QApplication.sendEvent(combo, wheel)
    assert combo.currentIndex() == before and not chosen and not opened
    assert w.labeling.checkpoint == w.project.snapshot().checkpoint


# -- tiles, menu, docs -----------------------------------------------------------------------
def test_reviewed_tiles_look_different_and_the_menu_has_the_review_keys(
        qtbot, win: MainWindow, images: dict) -> None:
    from fewshot_studio.gui.views.gallery import TILE, TileDelegate

    d = TileDelegate()

    def render(pred: Prediction, reviewed: bool) -> QImage:
        img = QImage(TILE, QImage.Format.Format_ARGB32)
        img.fill(0)
        p = QPainter(img)
        d._render(p, str(pred.path), pred, None, "", None, False, False, reviewed)
        p.end()
        return img

    for path in (images["by_conf"][-1], images["by_conf"][0]):  # ok, unknown
        pred = win.gallery_model.prediction_for(path)
        plain, reviewed = render(pred, False), render(pred, True)
        assert plain != reviewed, pred.status  # the check mark
        badges = TILE.height() - 40  # the badge row is drawn the same way either way
        assert plain.copy(0, badges, TILE.width(), 40) == reviewed.copy(0, badges,
                                                                        TILE.width(), 40)
    texts = [a.text() for a in win.menuBar().actions()]
    assert "&Review" in texts
    win.acts.accept.trigger()  # the menu entries act on the gallery's selection
    assert win.labeling.reviewed_paths() == {images["by_conf"][0]}
    win.acts.next_unreviewed.trigger()
    assert _current(win) == images["by_conf"][2]


def test_docs_and_help_list_every_review_key() -> None:
    table = DOCS.read_text(encoding="utf-8").split("## Keyboard", 1)[1]
    for row in ("| 1-9 |", "| Enter / Space |", "| N / Shift+N |", "| Ctrl+L / Esc |",
                "| Ctrl+Z / Ctrl+Shift+Z (Ctrl+Y) |", "| Delete / Backspace |"):
        assert row in table, row
    assert "Unreviewed" in DOCS.read_text(encoding="utf-8")
    for key in ("Enter / Space", "N / Shift+N", "1 – 9"):
        assert key in actions.SHORTCUTS, key  # Help > Keyboard shortcuts
