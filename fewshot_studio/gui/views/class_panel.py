"""The class panel: a card per class (:mod:`.class_card`: key number, colour, editable name,
example count and example thumbnails). Image files / folders dropped on a card become its
examples; gallery tiles dropped on a card are corrected to it; a folder of class sub-folders
dropped on the panel becomes one card per sub-folder. A new class opens with its name in edit
mode; a card's count includes the corrected images that join its examples ("5 examples + 2
corrected").

Suspicious examples (:meth:`ClassPanel.set_suspicious`: examples whose leave-one-out
prediction is another class) get a warning badge on their thumbnail and a line on their card
("⚠ 1 example looks like Red") with a *Fix* menu: *Move to “Red”* or *Remove*, one undo step
each (also in the thumbnail's context menu)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from PySide6.QtCore import Qt
from PySide6.QtGui import QAction, QDragEnterEvent, QDropEvent
from PySide6.QtWidgets import (
    QFrame,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QScrollArea,
    QVBoxLayout,
    QWidget,
)

from fewshot_studio.gui.controllers.classes import ClassesController
from fewshot_studio.gui.models.classes import ClassListModel
from fewshot_studio.gui.thumbnails import ThumbnailCache
from fewshot_studio.gui.undo import SetExamplesCommand
from fewshot_studio.gui.views.class_card import ClassCard, local_paths


class ClassPanel(QWidget):
    """Cards for every class in ``model``, rebuilt on structural changes."""

    def __init__(self, model: ClassListModel, ctl: ClassesController, thumbs: ThumbnailCache,
                 correct_to: Callable[[list[Path], int], None],
                 parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.model, self.ctl, self.thumbs, self._correct_to = model, ctl, thumbs, correct_to
        self.cards: list[ClassCard] = []
        self.corrected: dict[str, int] = {}  # class name -> corrected images joining it
        self.suspicious: dict[Path, str] = {}  # example -> the class it looks like
        self.current_row = 0
        self.setObjectName("classPanel")
        self.setAcceptDrops(True)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(12, 12, 8, 12)
        lay.setSpacing(8)
        head = QHBoxLayout()
        title = QLabel("Classes")
        title.setObjectName("panelTitle")
        self.add_button = QPushButton("+ Class")
        self.add_button.setObjectName("addClassButton")
        self.add_button.setToolTip("Add a class (Ctrl+Shift+N). Tip: drop a folder of class "
                                   "folders here to make one class per folder.")
        self.add_button.clicked.connect(lambda: self.add_class_and_edit())
        head.addWidget(title)
        head.addStretch(1)
        head.addWidget(self.add_button)
        lay.addLayout(head)
        self.scroll = QScrollArea()
        self.scroll.setWidgetResizable(True)
        self.scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.scroll.setFrameShape(QFrame.Shape.NoFrame)
        self.inner = QWidget()
        self.inner.setObjectName("cardsInner")
        self.cards_layout = QVBoxLayout(self.inner)
        self.cards_layout.setContentsMargins(0, 0, 4, 0)
        self.cards_layout.setSpacing(8)
        self.hint = QLabel("Add a class with “+ Class”, or drop a folder whose sub-folders "
                           "are classes.")
        self.hint.setObjectName("hintLabel")
        self.hint.setWordWrap(True)
        self.cards_layout.addWidget(self.hint)
        self.cards_layout.addStretch(1)
        self.scroll.setWidget(self.inner)
        lay.addWidget(self.scroll, 1)
        self.remove_action = QAction("Remove class", self)
        model.modelReset.connect(self.rebuild)
        model.rowsInserted.connect(self.rebuild)
        model.rowsRemoved.connect(self.rebuild)
        model.dataChanged.connect(self._on_changed)
        thumbs.ready.connect(self._on_thumb)
        self.rebuild()

    def rebuild(self) -> None:
        for c in self.cards:
            self.cards_layout.removeWidget(c)
            c.deleteLater()
        self.cards = [ClassCard(r, self, self) for r in range(self.model.rowCount())]
        for i, c in enumerate(self.cards):
            self.cards_layout.insertWidget(i, c)
        self.hint.setVisible(not self.cards)
        self.current_row = min(self.current_row, max(0, len(self.cards) - 1))

    def add_class_and_edit(self) -> int:
        """Add "Class N" and put its name in edit mode (selected: typing replaces it, Enter
        keeps it). Returns the new row."""
        row = self.ctl.add_class()
        self.set_current(row)
        if row < len(self.cards):
            card = self.cards[row]
            self.scroll.ensureWidgetVisible(card)
            card.name.setFocus(Qt.FocusReason.OtherFocusReason)
            card.name.selectAll()
        return row

    def set_corrected_counts(self, counts: dict[str, int]) -> None:
        """Corrected images per class name (those that join the examples) for the counts."""
        if counts != self.corrected:
            self.corrected = dict(counts)
            for c in self.cards:
                c.refresh()

    def set_suspicious(self, found: dict[Path, str]) -> None:
        """Examples whose leave-one-out prediction is another class (path -> its name): a
        badge and a warning line on their cards."""
        found = {Path(p): str(lab) for p, lab in found.items()}
        if found != self.suspicious:
            self.suspicious = found
            for c in self.cards:
                c.refresh()

    def move_example(self, path: Path, row: int, to_name: str) -> None:
        """Move example ``path`` from class ``row`` to class ``to_name``: one undo step."""
        to = self.model.row_of(to_name)
        if to is None or to == row or path not in self.model.spec(row).examples:
            return
        src = self.model.spec(row)
        stack = self.ctl.stack
        stack.beginMacro(f"Move {path.name} to “{to_name}”")
        stack.push(SetExamplesCommand(self.model, row, [p for p in src.examples if p != path],
                                      f"Remove {path.name} from “{src.name}”"))
        dst = self.model.spec(to).examples
        if path not in dst:
            stack.push(SetExamplesCommand(self.model, to, [*dst, path],
                                          f"Add {path.name} to “{to_name}”"))
        stack.endMacro()
        self.ctl.message.emit(f"Moved {path.name} to “{to_name}”")

    def _on_changed(self, top, bottom, roles=()) -> None:
        for r in range(top.row(), bottom.row() + 1):
            if r < len(self.cards):
                self.cards[r].refresh()

    def _on_thumb(self, key: str) -> None:
        for c in self.cards:
            c.set_thumb(key)

    def set_current(self, row: int) -> None:
        self.current_row = row

    def correct_to(self, paths: list[Path], row: int) -> None:
        self._correct_to(paths, row)

    def dragEnterEvent(self, e: QDragEnterEvent) -> None:
        if any(p.is_dir() for p in local_paths(e.mimeData())):
            e.acceptProposedAction()
        else:
            e.ignore()

    def dragMoveEvent(self, e) -> None:
        self.dragEnterEvent(e)

    def dropEvent(self, e: QDropEvent) -> None:
        folders = [p for p in local_paths(e.mimeData()) if p.is_dir()]
        if folders:
            self.ctl.import_class_folders(folders)
            e.acceptProposedAction()
