"""The query gallery: one row per query image, with its latest prediction (if any).

``GalleryModel`` is a flat ``QAbstractListModel`` with named roles (also exposed through
``roleNames`` for QML/debugging). It also holds the review state: each image the user accepted
(Enter) or corrected carries a *review mark*, the verdict (label, or None for unknown / error)
that was accepted. An image counts as reviewed while its prediction still shows that verdict; a
relabel that changes it makes the image unreviewed again. ``GalleryProxy`` is the review layer
on top: filter by class / unknown / corrected / error / unreviewed, sort by confidence (least
confident first). Sorting and filtering are explicit (``dynamicSortFilter`` off) so that
streaming results never trigger a 20,000-row re-sort on the UI thread.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from enum import IntEnum
from pathlib import Path
from typing import Any

import numpy as np
from PySide6.QtCore import (
    QAbstractListModel,
    QByteArray,
    QModelIndex,
    QPersistentModelIndex,
    QSortFilterProxyModel,
    Qt,
    Signal,
)
from PySide6.QtGui import QColor

from fewshot_studio.engine.api import Prediction, Status
from fewshot_studio.gui.thumbnails import ThumbnailCache

_Index = QModelIndex | QPersistentModelIndex


class Role(IntEnum):
    PATH = Qt.ItemDataRole.UserRole + 1
    LABEL = PATH + 1  # str | None (None: unlabeled, unknown or error)
    CONFIDENCE = PATH + 2  # float | None
    STATUS = PATH + 3  # "ok" | "unknown" | "error" | "" (not labeled yet)
    CORRECTED = PATH + 4
    ERROR = PATH + 5  # reason text ("" if none); includes thumbnail decode errors
    TOP = PATH + 6  # tuple of (label, prob)
    COLOR = PATH + 7  # QColor of the label's class (None if no label)
    PREDICTION = PATH + 8
    GUESS = PATH + 9  # best guess even when unknown
    TILE = PATH + 11  # (path str, Prediction | None, QPixmap | None, error, QColor | None,
    #                    reviewed, duplicate tag: "" | "group 3" | "duplicate")
    FILTER_KEY = PATH + 10  # "\tok\tlabel=cat\t" (+ "corrected\t") + "reviewed\t" or
    #                         "unreviewed\t" (+ "duplicate\t": in a duplicate group): what
    #                         the filters match
    REVIEWED = PATH + 12  # bool: accepted or corrected, and the prediction still agrees
    DUPLICATE = PATH + 13  # Path of the image kept in its place (marked duplicates), else None


ROLE_NAMES = {
    Role.PATH: b"path", Role.LABEL: b"label", Role.CONFIDENCE: b"confidence",
    Role.STATUS: b"status", Role.CORRECTED: b"corrected", Role.ERROR: b"error",
    Role.TOP: b"top", Role.COLOR: b"color", Role.PREDICTION: b"prediction",
    Role.GUESS: b"guess", Role.FILTER_KEY: b"filterKey", Role.TILE: b"tile",
    Role.REVIEWED: b"reviewed", Role.DUPLICATE: b"duplicate",
}


class GalleryModel(QAbstractListModel):
    """Query images in scan order (sorted path), their predictions and review marks."""

    reviewed_changed = Signal()  # review marks set, changed or cleared
    duplicates_changed = Signal()  # duplicate groups or marks set, changed or cleared

    def __init__(self, thumbs: ThumbnailCache, color_of: Callable[[str], QColor | None],
                 parent: Any = None) -> None:
        super().__init__(parent)
        self.thumbs = thumbs
        self.color_of = color_of
        self._paths: list[Path] = []
        self._keys: list[str] = []
        self._row: dict[str, int] = {}
        self._pred: list[Prediction | None] = []
        # path str -> the verdict the user accepted (label; None: unknown or error). Kept
        # across set_paths (marks may arrive before the folder scan); cleared by the owner.
        self._reviewed: dict[str, str | None] = {}
        # Near-duplicates: path str -> its group number (from 1; what the last search found,
        # dropped by set_paths), and marked duplicate -> the image kept in its place (kept
        # across set_paths like the review marks; export leaves marked ones out).
        self._group: dict[str, int] = {}
        self._dup_of: dict[str, Path] = {}
        thumbs.ready.connect(self._on_thumb)

    # -- content ------------------------------------------------------------------------
    def set_paths(self, paths: Sequence[Path]) -> None:
        self.beginResetModel()
        self._paths = [p if isinstance(p, Path) else Path(p) for p in paths]  # no re-parse
        self._keys = [str(p) for p in self._paths]
        self._row = {k: i for i, k in enumerate(self._keys)}
        self._pred = [None] * len(self._paths)
        self._group = {}
        self.endResetModel()

    def paths(self) -> list[Path]:
        return list(self._paths)

    def remove_paths(self, paths: Iterable[Path]) -> None:
        """Drop the rows of ``paths`` (with their predictions and review marks); the rest keep
        theirs and their order."""
        drop = {str(p) for p in paths}
        rows = [r for r, k in enumerate(self._keys) if k in drop]
        for r in reversed(rows):  # one removal per row, from the bottom: rows stay valid
            self.beginRemoveRows(QModelIndex(), r, r)
            del self._paths[r], self._keys[r], self._pred[r]
            self.endRemoveRows()
        if rows:
            self._row = {k: i for i, k in enumerate(self._keys)}
        if drop & self._dup_of.keys():
            for k in drop:
                self._dup_of.pop(k, None)
            self.duplicates_changed.emit()
        if drop & self._reviewed.keys():
            for k in drop:
                self._reviewed.pop(k, None)
            self.reviewed_changed.emit()

    def apply_predictions(self, preds: Iterable[Prediction]) -> int:
        """Store predictions for known paths; one ``dataChanged`` over the touched span.
        Returns how many rows changed."""
        lo, hi, n = len(self._pred), -1, 0
        for p in preds:
            r = self._row.get(str(p.path))
            if r is None:
                continue
            self._pred[r] = p
            lo, hi, n = min(lo, r), max(hi, r), n + 1
        if n:
            self.dataChanged.emit(self.index(lo), self.index(hi))
        return n

    def clear_predictions(self) -> None:
        if self._pred:
            self._pred = [None] * len(self._pred)
            self.dataChanged.emit(self.index(0), self.index(len(self._pred) - 1))

    def prediction(self, row: int) -> Prediction | None:
        return self._pred[row]

    def prediction_for(self, path: Path) -> Prediction | None:
        r = self._row.get(str(path))
        return None if r is None else self._pred[r]

    def predictions(self) -> list[Prediction]:
        """All predictions (rows never labeled are skipped), in path order."""
        return [p for p in self._pred if p is not None]

    def labeled_count(self) -> int:
        return sum(p is not None for p in self._pred)

    def row_of(self, path: Path | str) -> int | None:
        return self._row.get(str(path))

    # -- review marks --------------------------------------------------------------------
    def is_reviewed(self, row: int) -> bool:
        """The row has a prediction and it shows the verdict the user accepted."""
        p = self._pred[row]
        k = self._keys[row]
        return p is not None and k in self._reviewed and self._reviewed[k] == p.label

    def review_marks(self, paths: Iterable[Path] | None = None) -> dict[Path, str | None]:
        """Review marks (path -> accepted verdict) of ``paths`` that have one (all if None),
        whether or not the prediction still agrees; what a project would save."""
        if paths is None:
            return {Path(k): v for k, v in self._reviewed.items()}
        return {p: self._reviewed[str(p)] for p in paths if str(p) in self._reviewed}

    def set_review_marks(self, marks: Mapping[Path, str | None]) -> None:
        """Replace every review mark (opening a project; ``{}`` clears them)."""
        if not marks and not self._reviewed:
            return
        self._reviewed = {str(p): v for p, v in marks.items()}
        if self._pred:
            self.dataChanged.emit(self.index(0), self.index(len(self._pred) - 1))
        self.reviewed_changed.emit()

    def update_review_marks(self, marks: Mapping[Path, str | None],
                            clear: Collection[Path] = ()) -> None:
        """Set the marks of ``marks`` and remove those of ``clear``; repaint those rows."""
        rows = []
        for p, v in marks.items():
            self._reviewed[str(p)] = v
            rows.append(self._row.get(str(p)))
        for p in clear:
            self._reviewed.pop(str(p), None)
            rows.append(self._row.get(str(p)))
        known = [r for r in rows if r is not None]
        if known:
            self.dataChanged.emit(self.index(min(known)), self.index(max(known)))
        if rows:
            self.reviewed_changed.emit()

    def rename_review_marks(self, old: str, new: str) -> None:
        """A class was renamed: marks that accepted ``old`` now accept ``new``."""
        keys = [k for k, v in self._reviewed.items() if v == old]
        if keys:
            self.update_review_marks({Path(k): new for k in keys})

    def reviewed_paths(self) -> set[Path]:
        """Images whose prediction shows the verdict the user accepted or corrected."""
        return {self._paths[r] for r in range(len(self._paths)) if self.is_reviewed(r)}

    def reviewed_count(self) -> int:
        if not self._reviewed:
            return 0
        return sum(self.is_reviewed(r) for r in range(len(self._paths)))

    # -- near-duplicates ---------------------------------------------------------------------
    def set_duplicate_groups(self, groups: Sequence[Sequence[Path]]) -> None:
        """The groups a duplicate search found (each two or more paths), numbered from 1."""
        self._group = {str(p): i for i, g in enumerate(groups, 1) for p in g}
        self._all_changed()
        self.duplicates_changed.emit()

    def duplicate_groups(self) -> list[list[Path]]:
        """The groups found, members in row order (images no longer shown are left out)."""
        groups: dict[int, list[Path]] = {}
        for p in self._paths:
            if (g := self._group.get(str(p))) is not None:
                groups.setdefault(g, []).append(p)
        return [groups[g] for g in sorted(groups) if len(groups[g]) > 1]

    def duplicate_marks(self, paths: Iterable[Path] | None = None) -> dict[Path, Path]:
        """Marked duplicate -> the image kept in its place, for ``paths`` (all if None)."""
        if paths is None:
            return {Path(k): v for k, v in self._dup_of.items()}
        return {p: self._dup_of[str(p)] for p in paths if str(p) in self._dup_of}

    def set_duplicate_marks(self, marks: Mapping[Path, Path]) -> None:
        """Replace every duplicate mark (opening a project; ``{}`` clears them)."""
        if marks or self._dup_of:
            self._dup_of = {str(p): Path(k) for p, k in marks.items()}
            self._all_changed()
            self.duplicates_changed.emit()

    def update_duplicate_marks(self, changes: Mapping[Path, Path | None]) -> None:
        """Mark (-> the kept image) or unmark (None) some images (the undo command)."""
        for p, kept in changes.items():
            if kept is None:
                self._dup_of.pop(str(p), None)
            else:
                self._dup_of[str(p)] = kept
        if changes:
            self._all_changed()
            self.duplicates_changed.emit()

    def _duplicate_tag(self, r: int) -> str:
        k = self._keys[r]
        if k in self._dup_of:
            return "duplicate"
        return f"group {self._group[k]}" if k in self._group else ""

    def _all_changed(self) -> None:
        if self._pred:
            self.dataChanged.emit(self.index(0), self.index(len(self._pred) - 1))

    def refresh_colors(self) -> None:
        if self._pred:
            self.dataChanged.emit(self.index(0), self.index(len(self._pred) - 1),
                                  [Role.COLOR, Role.LABEL])

    def sort_rows(self, by_confidence: bool, by_group: bool = False) -> None:
        """Reorder rows in place (numpy argsort; selection follows through persistent
        indexes): by duplicate group (``by_group``: each group's members together, by path,
        the rest after), by confidence (errors first, least confident first, unlabeled last)
        or by path. O(n log n) in C, so 20,000 rows sort in milliseconds."""
        n = len(self._paths)
        if by_group:
            group = np.array([self._group.get(k, 1 << 30) for k in self._keys], np.int64)
            by_path = np.argsort(np.array(self._keys, dtype=object), kind="stable")
            order = by_path[np.argsort(group[by_path], kind="stable")]
        elif by_confidence:
            key = np.array([_key(p) for p in self._pred], dtype=np.float64)
            order = np.lexsort((np.arange(n), key))
        else:
            order = np.argsort(np.array(self._keys, dtype=object), kind="stable")
        self.apply_order([int(i) for i in order])

    def apply_order(self, order: Sequence[int]) -> None:
        """Reorder rows in place: new row ``k`` is old row ``order[k]`` (a permutation);
        selection follows through persistent indexes. Find similar orders rows this way."""
        n = len(self._paths)
        order = list(order)
        if order == list(range(n)):
            return
        self.layoutAboutToBeChanged.emit()
        new_row = [0] * n
        for new, old in enumerate(order):
            new_row[old] = new
        self._paths = [self._paths[i] for i in order]
        self._keys = [self._keys[i] for i in order]
        self._pred = [self._pred[i] for i in order]
        self._row = {k: i for i, k in enumerate(self._keys)}
        old_ix = self.persistentIndexList()
        self.changePersistentIndexList(old_ix, [self.index(new_row[i.row()]) for i in old_ix])
        self.layoutChanged.emit()

    def _on_thumb(self, key: str) -> None:
        r = self._row.get(key)
        if r is not None:
            ix = self.index(r)
            self.dataChanged.emit(ix, ix, [Qt.ItemDataRole.DecorationRole, Role.ERROR])

    # -- Qt API ---------------------------------------------------------------------------
    def rowCount(self, parent: _Index = QModelIndex()) -> int:  # noqa: B008
        return 0 if parent.isValid() else len(self._paths)

    def roleNames(self) -> dict[int, QByteArray]:
        return {int(k): QByteArray(v) for k, v in ROLE_NAMES.items()}

    def flags(self, index: _Index) -> Qt.ItemFlag:
        f = super().flags(index)
        return f | Qt.ItemFlag.ItemIsDragEnabled if index.isValid() else f

    def data(self, index: _Index, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        r = index.row()
        if not index.isValid() or r >= len(self._paths):
            return None
        get = _ROLE_DATA.get(role)
        return None if get is None else get(self, r, self._pred[r])

    def _tile(self, r: int, p: Prediction | None) -> tuple[Any, ...]:
        """Everything a tile paints, in one call."""
        k = self._keys[r]
        return (k, p, self.thumbs.get(k), self._error(r, p),
                self.color_of(p.label) if p and p.label else None, self.is_reviewed(r),
                self._duplicate_tag(r))

    def _error(self, r: int, p: Prediction | None) -> str:
        return (p.error if p and p.error else "") or self.thumbs.error(self._keys[r]) or ""

    def _filter_key(self, r: int, p: Prediction | None) -> str:
        dup = "duplicate\t" if self._keys[r] in self._group else ""
        if p is None:
            return "\tunlabeled\t" + dup
        return (f"\t{p.status}\tlabel={p.label}\t" + ("corrected\t" if p.corrected else "")
                + ("reviewed\t" if self.is_reviewed(r) else "unreviewed\t") + dup)

    def _tooltip(self, r: int, p: Prediction | None) -> str:
        name = self._paths[r].name
        if (kept := self._dup_of.get(self._keys[r])) is not None:
            name += f"\nduplicate of {kept.name} (left out of exports)"
        if p is None:
            return name
        if p.status == Status.ERROR:
            return f"{name}\nerror: {p.error}"
        tops = "\n".join(f"  {lab}: {prob:.0%}" for lab, prob in p.top)
        head = f"{p.label} (corrected)" if p.corrected else (p.label or "unknown")
        if not p.corrected and self.is_reviewed(r):
            head += " (reviewed)"
        return f"{name}\n{head}\n{tops}"


class GalleryProxy(QSortFilterProxyModel):
    """Filter (``set_filter``) and sort (``set_sort``) for review. Filters: ``"all"``,
    ``"unknown"``, ``"corrected"``, ``"error"``, ``"unlabeled"``, ``"unreviewed"`` (labeled,
    not yet accepted or corrected), ``"duplicate"`` (the members of near-duplicate groups,
    each group together) or ``"class:<name>"``."""

    def __init__(self, parent: Any = None) -> None:
        super().__init__(parent)
        self.setDynamicSortFilter(False)
        # Filtering is a regular expression on Role.FILTER_KEY, matched in C++; "all" is the
        # empty pattern, which Qt accepts without asking the model (20,000 rows: no Python).
        self.setFilterRole(Role.FILTER_KEY)
        self._filter = "all"
        self._by_confidence = False

    @property
    def filter(self) -> str:
        return self._filter

    @property
    def by_confidence(self) -> bool:
        return self._by_confidence

    def set_filter(self, mode: str) -> None:
        self._refilter(mode)

    @staticmethod
    def pattern_for(mode: str) -> str:
        if mode.startswith("class:"):
            return re.escape(f"\tlabel={mode[6:]}\t")
        return "" if mode == "all" else re.escape(f"\t{mode}\t")

    def _refilter(self, mode: str) -> None:
        grouped = (self._filter == "duplicate", mode == "duplicate")
        self._filter = mode
        if grouped[0] != grouped[1]:  # into or out of the grouped order
            self._source().sort_rows(self._by_confidence, by_group=grouped[1])
        self.setFilterRegularExpression(self.pattern_for(mode))

    def _source(self) -> GalleryModel:
        src = self.sourceModel()
        assert isinstance(src, GalleryModel)
        return src

    def set_sort(self, by_confidence: bool) -> None:
        """Sorting reorders the source model (in C, via numpy); the proxy keeps its order."""
        self._by_confidence = by_confidence
        self._source().sort_rows(by_confidence, by_group=self._filter == "duplicate")

    def refresh(self) -> None:
        """Re-apply filter and sort (after a labeling run or a correction)."""
        if self._by_confidence or self._filter == "duplicate":
            self._source().sort_rows(self._by_confidence, by_group=self._filter == "duplicate")
        if self._filter != "all":  # same pattern: force a re-match
            if hasattr(self, "beginFilterChange"):  # Qt >= 6.9 (invalidateFilter deprecated)
                self.beginFilterChange()
                self.endFilterChange()
            else:
                self.invalidateFilter()

    def source_row(self, proxy_row: int) -> int:
        return self.mapToSource(self.index(proxy_row, 0)).row()


_RowData = Callable[[GalleryModel, int, Prediction | None], Any]
# role -> what ``data`` returns for row r with prediction p (None: not labeled yet)
_ROLE_DATA: dict[int, _RowData] = {
    Role.TILE: GalleryModel._tile,
    Qt.ItemDataRole.DecorationRole: lambda m, r, p: m.thumbs.get(m._keys[r]),
    Qt.ItemDataRole.DisplayRole: lambda m, r, p: p.label if p else None,
    Role.LABEL: lambda m, r, p: p.label if p else None,
    Role.PATH: lambda m, r, p: m._paths[r],
    Qt.ItemDataRole.ToolTipRole: GalleryModel._tooltip,
    Role.CONFIDENCE: lambda m, r, p: p.confidence if p else None,
    Role.STATUS: lambda m, r, p: str(p.status) if p else "",
    Role.CORRECTED: lambda m, r, p: bool(p and p.corrected),
    Role.ERROR: GalleryModel._error,
    Role.TOP: lambda m, r, p: p.top if p else (),
    Role.GUESS: lambda m, r, p: p.top[0][0] if p and p.top else None,
    Role.COLOR: lambda m, r, p: m.color_of(p.label) if p and p.label else None,
    Role.PREDICTION: lambda m, r, p: p,
    Role.REVIEWED: lambda m, r, p: m.is_reviewed(r),
    Role.FILTER_KEY: GalleryModel._filter_key,
    Role.DUPLICATE: lambda m, r, p: m._dup_of.get(m._keys[r]),
}


def _key(p: Prediction | None) -> float:
    """Errors first, then least confident; unlabeled last."""
    if p is None:
        return 2.0
    return -1.0 if p.status == Status.ERROR else p.confidence
