"""The classes: an ordered list model of :class:`~fewshot_studio.gui.project_io.ClassSpec`.

Row order is class order: the 1-9 keys pick a class by position and the engine's class index
follows it. Mutations here are raw; undoable edits go through
:mod:`fewshot_studio.gui.undo` commands built by the classes controller.
"""

from __future__ import annotations

from enum import IntEnum
from pathlib import Path
from typing import Any

from PySide6.QtCore import (
    QAbstractListModel,
    QByteArray,
    QModelIndex,
    QPersistentModelIndex,
    Qt,
    Signal,
)
from PySide6.QtGui import QColor

from fewshot_studio.gui.project_io import ClassSpec

_Index = QModelIndex | QPersistentModelIndex


class ClassRole(IntEnum):
    NAME = Qt.ItemDataRole.UserRole + 1
    COLOR = NAME + 1  # QColor
    EXAMPLES = NAME + 2  # list[Path]
    COUNT = NAME + 3
    SPEC = NAME + 4


class ClassListModel(QAbstractListModel):
    """Classes in order. ``support_changed`` fires whenever names or examples change (what
    the engine sees), not for colour changes."""

    support_changed = Signal()

    def __init__(self, parent: Any = None) -> None:
        super().__init__(parent)
        self._items: list[ClassSpec] = []

    # -- reading --------------------------------------------------------------------------
    def specs(self) -> list[ClassSpec]:
        return [ClassSpec(c.name, c.color, list(c.examples)) for c in self._items]

    def spec(self, row: int) -> ClassSpec:
        return self._items[row]

    def names(self) -> list[str]:
        return [c.name for c in self._items]

    def colors(self) -> list[str]:
        return [c.color for c in self._items]

    def row_of(self, name: str) -> int | None:
        for i, c in enumerate(self._items):
            if c.name == name:
                return i
        return None

    def color_of(self, name: str) -> QColor | None:
        r = self.row_of(name)
        return QColor(self._items[r].color) if r is not None else None

    def support(self) -> dict[str, list[Path]]:
        return {c.name: list(c.examples) for c in self._items}

    def total_examples(self) -> int:
        return sum(len(c.examples) for c in self._items)

    # -- raw mutations (the undo commands call these) ------------------------------------------
    def set_specs(self, specs: list[ClassSpec]) -> None:
        self.beginResetModel()
        self._items = [ClassSpec(c.name, c.color, list(c.examples)) for c in specs]
        self.endResetModel()
        self.support_changed.emit()

    def insert(self, row: int, spec: ClassSpec) -> None:
        self.beginInsertRows(QModelIndex(), row, row)
        self._items.insert(row, ClassSpec(spec.name, spec.color, list(spec.examples)))
        self.endInsertRows()
        self.support_changed.emit()

    def remove(self, row: int) -> ClassSpec:
        self.beginRemoveRows(QModelIndex(), row, row)
        spec = self._items.pop(row)
        self.endRemoveRows()
        self.support_changed.emit()
        return spec

    def rename(self, row: int, name: str) -> None:
        self._items[row].name = name
        self._changed(row)
        self.support_changed.emit()

    def set_color(self, row: int, color: str) -> None:
        self._items[row].color = color
        self._changed(row)

    def set_examples(self, row: int, examples: list[Path]) -> None:
        self._items[row].examples = list(examples)
        self._changed(row)
        self.support_changed.emit()

    def _changed(self, row: int) -> None:
        ix = self.index(row)
        self.dataChanged.emit(ix, ix)

    # -- Qt API ----------------------------------------------------------------------------
    def rowCount(self, parent: _Index = QModelIndex()) -> int:  # noqa: B008
        return 0 if parent.isValid() else len(self._items)

    def roleNames(self) -> dict[int, QByteArray]:
        return {int(r): QByteArray(r.name.lower().encode()) for r in ClassRole}

    def data(self, index: _Index, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if not index.isValid() or index.row() >= len(self._items):
            return None
        c = self._items[index.row()]
        if role in (Qt.ItemDataRole.DisplayRole, ClassRole.NAME):
            return c.name
        if role in (Qt.ItemDataRole.DecorationRole, ClassRole.COLOR):
            return QColor(c.color)
        if role == ClassRole.EXAMPLES:
            return list(c.examples)
        if role == ClassRole.COUNT:
            return len(c.examples)
        if role == ClassRole.SPEC:
            return c
        return None
