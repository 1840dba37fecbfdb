"""The keyboard-first review loop: correct (1-9), accept (Enter / Space), jump to the next
unreviewed image (N), and keep the cursor where the user is working.

Works on the gallery's selection model in *view order* (the proxy: current filter and sort).
A correction relabels and re-sorts the gallery, so the corrected tile may move (to the bottom,
in "least confident first"); the cursor does not follow it but goes to the image that came
after it before the relabel, and ``cursor_moved`` asks the view to scroll it into view.
Corrections and acceptances are undoable (:mod:`..undo`); the review marks themselves live in
the gallery model, behind the labeling controller's review API."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QItemSelectionModel, QModelIndex, QObject, Signal
from PySide6.QtGui import QUndoStack

from fewshot_studio.gui.controllers.labeling import LabelingController
from fewshot_studio.gui.models.classes import ClassListModel
from fewshot_studio.gui.models.gallery import GalleryModel, GalleryProxy, Role
from fewshot_studio.gui.undo import AcceptCommand, CorrectCommand

_Sel = QItemSelectionModel.SelectionFlag


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"


class ReviewController(QObject):
    message = Signal(str, int)  # status bar text, timeout in ms
    cursor_moved = Signal(QModelIndex)  # a proxy index the view should scroll into view

    def __init__(self, gallery: GalleryModel, proxy: GalleryProxy,
                 selection: QItemSelectionModel, labeling: LabelingController,
                 classes: ClassListModel, stack: QUndoStack,
                 parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.gallery, self.proxy, self.selection = gallery, proxy, selection
        self.labeling, self.classes, self.stack = labeling, classes, stack
        labeling.reviewed_changed.connect(self._on_reviewed_changed)

    # -- what the keys act on ----------------------------------------------------------------
    def target_rows(self) -> list[int]:
        """Proxy rows of the selected tiles, in view order; the current tile if none is
        selected (keyboard focus puts a cursor on a tile without selecting it)."""
        rows = sorted({i.row() for i in self.selection.selectedIndexes()})
        cur = self.selection.currentIndex()
        if not rows and cur.isValid():
            rows = [cur.row()]
        return rows

    def selected_paths(self) -> list[Path]:
        """The selected images, in view order (not the cursor alone)."""
        return [self._path_at(r) for r in sorted({i.row() for i in
                                                  self.selection.selectedIndexes()})]

    def _path_at(self, proxy_row: int) -> Path:
        return Path(self.proxy.index(proxy_row, 0).data(Role.PATH))

    def _next_after(self, rows: list[int]) -> Path | None:
        """The first unselected image after the last of ``rows`` (None at the end)."""
        chosen = set(rows)
        for r in range(max(rows) + 1, self.proxy.rowCount()):
            if r not in chosen:
                return self._path_at(r)
        return None

    # -- commands ------------------------------------------------------------------------------
    def correct_selected(self, class_row: int) -> None:
        """Correct the selected images to class ``class_row`` (0-based), then move the cursor
        to the image after them."""
        rows = self.target_rows()
        if not rows or not 0 <= class_row < self.classes.rowCount():
            return
        paths = [self._path_at(r) for r in rows]
        nxt = self._next_after(rows)
        self.correct_paths(paths, class_row)
        self.move_to(nxt, fallback_row=rows[0])

    def correct_paths(self, paths: list[Path], class_row: int) -> bool:
        """Correct ``paths`` to class ``class_row`` (undoable; marks them reviewed).
        False if nothing changed (already corrected to that class)."""
        name = self.classes.names()[class_row]
        prev = {p: self.labeling.corrections.get(p) for p in paths}
        if all(v == name for v in prev.values()):
            return False
        self.stack.push(CorrectCommand(self.labeling, paths, name, prev,
                                       reviewer=self.labeling))
        self.message.emit(f"Corrected {_plural(len(paths), 'image')} to “{name}”", 4000)
        return True

    def accept_selected(self) -> None:
        """Accept the shown verdict of the selected images (undoable), then move the cursor
        to the image after them. Images not labeled yet are skipped."""
        rows = self.target_rows()
        if not rows:
            return
        marks: dict[Path, str | None] = {}
        for r in rows:
            ix = self.proxy.index(r, 0)
            pred = ix.data(Role.PREDICTION)
            if pred is not None and not ix.data(Role.REVIEWED):
                marks[Path(ix.data(Role.PATH))] = pred.label
        labeled = any(self.proxy.index(r, 0).data(Role.PREDICTION) is not None for r in rows)
        if not labeled:
            self.message.emit("Nothing to accept yet: label the images first (Ctrl+L)", 4000)
            return
        nxt = self._next_after(rows)
        if marks:
            self.stack.push(AcceptCommand(self.labeling, marks))
            self.message.emit(f"Accepted {_plural(len(marks), 'prediction')}", 3000)
        self.move_to(nxt, fallback_row=rows[0])

    def next_unreviewed(self, step: int = 1) -> bool:
        """Move the cursor to the next (``step`` 1) or previous (-1) labeled image that is not
        reviewed yet, in view order, wrapping around. False if there is none."""
        n = self.proxy.rowCount()
        cur = self.selection.currentIndex()
        start = cur.row() if cur.isValid() else (-1 if step > 0 else n)
        for i in range(1, n + 1):
            ix = self.proxy.index((start + step * i) % n, 0)
            if ix.data(Role.PREDICTION) is not None and not ix.data(Role.REVIEWED):
                self._select(ix)
                return True
        if self.gallery.labeled_count():
            self.message.emit("Every labeled image shown is reviewed", 4000)
        else:
            self.message.emit("Nothing to review yet: label the images first (Ctrl+L)", 4000)
        return False

    # -- the cursor ----------------------------------------------------------------------------
    def move_to(self, path: Path | None, fallback_row: int | None = None) -> None:
        """Select ``path`` and make it current; if it is not shown (None, or filtered out),
        the tile now at ``fallback_row``; else leave the selection alone."""
        ix = QModelIndex()
        if path is not None and (row := self.gallery.row_of(path)) is not None:
            ix = self.proxy.mapFromSource(self.gallery.index(row))
        if not ix.isValid() and fallback_row is not None and self.proxy.rowCount():
            if path is None and self.selection.hasSelection():
                cur = self.selection.currentIndex()  # at the end: stay on the last tile
                if cur.isValid():
                    self.cursor_moved.emit(cur)
                return
            ix = self.proxy.index(min(fallback_row, self.proxy.rowCount() - 1), 0)
        if ix.isValid():
            self._select(ix)

    def select_first_if_none(self) -> None:
        """Put the cursor on a tile if there is none, so that the keys work at once."""
        if self.selection.hasSelection() or self.proxy.rowCount() == 0:
            return
        cur = self.selection.currentIndex()
        self._select(cur if cur.isValid() else self.proxy.index(0, 0))

    def _select(self, ix: QModelIndex) -> None:
        self.selection.setCurrentIndex(ix, _Sel.ClearAndSelect)
        self.cursor_moved.emit(ix)

    def _on_reviewed_changed(self) -> None:
        if self.proxy.filter == "unreviewed":  # reviewed images leave this view at once
            self.proxy.refresh()

    # -- counts --------------------------------------------------------------------------------
    def counts(self) -> tuple[int, int]:
        """(reviewed, images)."""
        return self.gallery.reviewed_count(), self.gallery.rowCount()
