"""Suspicious class examples in the class panel: after a run the engine's leave-one-out
verdict (``suspicious_examples``, asked in the engine thread) puts a badge on the example's
thumbnail and a line on its card; *Move to* and *Remove* are one undo step each.

A fake engine stands in for the model: it calls the stray example suspicious while the
green class holds it."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import ClassVar

import pytest

pytest.importorskip("pytestqt")

from _gui_helpers import FakeSession, make_image, shown_window
from _gui_helpers import wait_idle as _idle
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QMenu

from fewshot_studio.engine.api import Prediction, Status
from fewshot_studio.gui import project_io as pio
from fewshot_studio.gui.main_window import MainWindow
from fewshot_studio.gui.views import class_card
from fewshot_studio.gui.views.class_card import SUSPICIOUS_ROLE, ClassCard, badged

CLASSES = ["red", "green"]


class SuspiciousSession(FakeSession):
    """Every image is "red" at 0.9; ``stray`` looks like red while it is a green example."""

    stray: ClassVar[Path] = Path()
    threads: ClassVar[list[int]] = []

    def guess(self, index: int, path: Path) -> Prediction:
        return Prediction(path, "red", 0.9, 0.5, Status.OK, (("red", 0.9),))

    def suspicious_examples(self) -> dict[Path, str]:
        SuspiciousSession.threads.append(threading.get_ident())
        return {self.stray: "red"} if self.stray in self.classes.get("green", []) else {}


@pytest.fixture
def images(tmp_path: Path) -> dict:
    red = [make_image(tmp_path / "support" / "red" / f"r{i}.png", (220, 40, 40), i, 24)
           for i in range(2)]
    green = [make_image(tmp_path / "support" / "green" / f"g{i}.png", (40, 180, 60), 10 + i,
                        24) for i in range(2)]
    stray = make_image(tmp_path / "support" / "green" / "stray.png", (220, 40, 40), 20, 24)
    for i in range(3):
        make_image(tmp_path / "query" / f"q{i}.png", (220, 40, 40), 30 + i, 24)
    return {"red": red, "green": [*green, stray], "stray": stray.resolve(),
            "query": tmp_path / "query"}


@pytest.fixture
def win(qtbot, images: dict) -> MainWindow:
    SuspiciousSession.stray, SuspiciousSession.threads = images["stray"], []
    w = shown_window(qtbot, session_factory=SuspiciousSession)
    w.project.apply(pio.Project(
        classes=[pio.ClassSpec(n, pio.PALETTE[i], [p.resolve() for p in images[n]])
                 for i, n in enumerate(CLASSES)],
        query_folder=images["query"], checkpoint="fake"))
    qtbot.waitUntil(lambda: w.gallery_model.rowCount() == 3, timeout=10_000)
    with qtbot.waitSignal(w.labeling.run_finished, timeout=30_000):
        assert w.labeling.label() is not None
    _idle(qtbot, w)
    yield w
    w.close()



def _card(w: MainWindow, name: str) -> ClassCard:
    return w.class_panel.cards[w.classes.row_of(name)]


def _flagged(card: ClassCard) -> dict[str, str]:
    ex = card.examples
    return {Path(ex.item(i).data(Qt.ItemDataRole.UserRole)).name: ex.item(i).data(SUSPICIOUS_ROLE)
            for i in range(ex.count()) if ex.item(i).data(SUSPICIOUS_ROLE)}


def _action(card: ClassCard, name: str):
    acts = [a for a in card.fix.menu().actions() if a.objectName() == name]
    assert len(acts) == 1, [a.text() for a in card.fix.menu().actions()]
    return acts[0]


def _shows_warning(card: ClassCard) -> bool:
    return card.warn.isVisible() and card.fix.isVisible()


def test_a_suspicious_example_gets_a_badge_and_a_line(qtbot, win: MainWindow) -> None:
    green, red = _card(win, "green"), _card(win, "red")
    assert _flagged(green) == {"stray.png": "red"}
    assert _shows_warning(green) and green.warn.text() == "⚠ 1 example looks like “red”"
    item = green.examples.item(2)
    assert "Looks like “red”" in item.toolTip() and not item.icon().isNull()
    assert badged(None).toImage().pixelColor(65, 21).name() == "#f59e0b"  # the amber badge
    assert [a.text() for a in green.fix.menu().actions()] == ["Move to “red”", "Remove example"]
    assert _flagged(red) == {} and not _shows_warning(red)
    main = threading.main_thread().ident
    assert SuspiciousSession.threads and main not in SuspiciousSession.threads


def test_move_to_the_class_it_looks_like_is_one_undo_step(qtbot, win: MainWindow,
                                                          images: dict) -> None:
    stray, depth = images["stray"], win.stack.count()
    _action(_card(win, "green"), "moveExample").trigger()
    assert stray in win.classes.spec(win.classes.row_of("red")).examples
    assert stray not in win.classes.spec(win.classes.row_of("green")).examples
    assert not _shows_warning(_card(win, "green"))  # at once, before the relabel
    _idle(qtbot, win)
    assert win.class_panel.suspicious == {}  # the relabel asked the engine again
    assert win.stack.count() == depth + 1 and "Move stray.png" in win.stack.undoText()
    win.stack.undo()
    assert stray in win.classes.spec(win.classes.row_of("green")).examples
    assert stray not in win.classes.spec(win.classes.row_of("red")).examples
    _idle(qtbot, win)
    assert _flagged(_card(win, "green")) == {"stray.png": "red"}
    assert _shows_warning(_card(win, "green"))


def test_remove_the_suspicious_example_is_one_undo_step(qtbot, win: MainWindow,
                                                        images: dict) -> None:
    stray, depth = images["stray"], win.stack.count()
    green_before = list(win.classes.spec(win.classes.row_of("green")).examples)
    _action(_card(win, "green"), "removeExample").trigger()
    assert win.classes.spec(win.classes.row_of("green")).examples == [
        p for p in green_before if p != stray]
    assert stray not in win.classes.spec(win.classes.row_of("red")).examples
    _idle(qtbot, win)
    assert not _shows_warning(_card(win, "green")) and _flagged(_card(win, "green")) == {}
    assert win.stack.count() == depth + 1
    win.stack.undo()
    assert win.classes.spec(win.classes.row_of("green")).examples == green_before
    _idle(qtbot, win)
    assert _shows_warning(_card(win, "green"))


def test_a_new_model_clears_the_warnings(qtbot, win: MainWindow) -> None:
    assert _shows_warning(_card(win, "green"))
    win.labeling.set_checkpoint("another")
    assert not _shows_warning(_card(win, "green")) and _flagged(_card(win, "green")) == {}


def test_the_thumbnail_menu_offers_the_fix(qtbot, win: MainWindow, monkeypatch) -> None:
    shown: list[list[str]] = []

    class Menu(QMenu):
        def exec(self, *args: object) -> None:  # type: ignore[override]
            shown.append([x.text() for x in self.actions()])

    monkeypatch.setattr(class_card, "QMenu", Menu)
    view = _card(win, "green").examples
    for row in (2, 0):  # the stray example, then a good one
        view.customContextMenuRequested.emit(view.visualItemRect(view.item(row)).center())
    assert shown[0][:2] == ["Move to “red”", "Remove example"]
    assert "Move to “red”" not in shown[1]
