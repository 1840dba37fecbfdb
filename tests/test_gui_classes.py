"""Class panel: drag-and-drop of files and folders, Delete, paste, rename, undo/redo."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("pytestqt")

from _gui_helpers import drop_urls, make_dataset, make_image, shown_window
from PySide6.QtCore import Qt
from PySide6.QtGui import (
    QGuiApplication,
    QImage,
)

from fewshot_studio.gui.main_window import MainWindow

# Qt marks the QPoint constructors of drag events deprecated; they are what Qt itself sends.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture
def win(qtbot):
    w = shown_window(qtbot)
    yield w
    w.close()



def test_drop_files_and_folder_onto_card(qtbot, win: MainWindow, tmp_path: Path) -> None:
    win.classes_ctl.add_class("cars")
    card = win.class_panel.cards[0]
    a = make_image(tmp_path / "a.jpg", (200, 0, 0), 1)
    b = make_image(tmp_path / "more" / "b.png", (0, 200, 0), 2)
    c = make_image(tmp_path / "more" / "deep" / "c.png", (0, 0, 200), 3)
    (tmp_path / "notes.txt").write_text("not an image")
    assert drop_urls(card.examples.viewport(), [a, tmp_path / "notes.txt", tmp_path / "more"])
    qtbot.waitUntil(lambda: win.classes.spec(0).examples == [a, b, c], timeout=5000)
    card = win.class_panel.cards[0]
    assert card.count.text().startswith("3 examples")
    assert card.examples.count() == 3
    # thumbnails arrive off the UI thread and land on the card
    qtbot.waitUntil(lambda: all(not card.examples.item(i).icon().isNull() for i in range(3)),
                    timeout=5000)
    # dropping the same file again adds nothing
    assert drop_urls(card.examples.viewport(), [a])
    qtbot.wait(200)
    assert len(win.classes.spec(0).examples) == 3

    # Delete removes the selected examples; undo brings them back
    card.examples.setFocus()
    card.examples.item(1).setSelected(True)
    qtbot.keyClick(card.examples, Qt.Key.Key_Delete)
    assert win.classes.spec(0).examples == [a, c]
    win.stack.undo()
    assert win.classes.spec(0).examples == [a, b, c]
    win.stack.redo()
    assert win.classes.spec(0).examples == [a, c]


def test_drop_class_folder_tree_onto_panel(qtbot, win: MainWindow, tmp_path: Path) -> None:
    support, _ = make_dataset(tmp_path / "ds", n_support=2, n_query=0)
    (tmp_path / "ds" / "support" / "empty").mkdir()
    assert drop_urls(win.class_panel, [tmp_path / "ds" / "support"])
    qtbot.waitUntil(lambda: win.classes.rowCount() == 3, timeout=5000)
    assert win.classes.names() == ["blue", "green", "red"]  # sorted; empty folder skipped
    for name in win.classes.names():
        row = win.classes.row_of(name)
        assert win.classes.spec(row).examples == [p.resolve() for p in support[name]]
    assert len(win.class_panel.cards) == 3
    assert len(set(win.classes.colors())) == 3
    assert win.project.dirty
    win.stack.undo()  # one macro: the whole import goes
    assert win.classes.rowCount() == 0
    assert win.class_panel.cards == []


def test_files_dropped_on_panel_are_not_accepted(win: MainWindow, tmp_path: Path) -> None:
    a = make_image(tmp_path / "a.png", (1, 2, 3), 1)
    assert not drop_urls(win.class_panel, [a])
    assert win.classes.rowCount() == 0


def test_paste_image_from_clipboard(qtbot, win: MainWindow) -> None:
    win.classes_ctl.add_class("pasted")
    img = QImage(40, 30, QImage.Format.Format_RGB32)
    img.fill(Qt.GlobalColor.magenta)
    QGuiApplication.clipboard().setImage(img)
    win.acts.paste.trigger()
    ex = win.classes.spec(0).examples
    assert len(ex) == 1 and ex[0].is_file()
    back = QImage(str(ex[0]))
    assert (back.width(), back.height()) == (40, 30)


def test_rename_recolour_remove_and_undo(qtbot, win: MainWindow) -> None:
    win.classes_ctl.add_class("cat")
    win.classes_ctl.add_class("dog")
    card = win.class_panel.cards[1]
    card.name.setText("wolf")
    card.name.editingFinished.emit()
    assert win.classes.names() == ["cat", "wolf"]
    card = win.class_panel.cards[1]
    card.name.setText("cat")  # taken: refused, name restored
    card.name.editingFinished.emit()
    assert win.classes.names() == ["cat", "wolf"]
    win.classes_ctl.set_color(0, "#123456")
    assert win.classes.spec(0).color == "#123456"
    win.classes_ctl.remove_class(0)
    assert win.classes.names() == ["wolf"]
    for _ in range(3):
        win.stack.undo()
    assert win.classes.names() == ["cat", "dog"]
    assert win.classes.spec(0).color != "#123456"
    assert [c.name.text() for c in win.class_panel.cards] == ["cat", "dog"]
    assert [c.key.text() for c in win.class_panel.cards] == ["1", "2"]
