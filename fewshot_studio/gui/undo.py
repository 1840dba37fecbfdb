"""Undoable edits (``QUndoStack`` commands): classes, their examples and corrections.

Each command holds the before and after state it needs, so redo/undo are exact inverses.
Corrections go through a ``CorrectionSink`` (the labeling controller), which relabels in a
worker; the command itself never calls the engine. Review marks (accepting a prediction; a
correction marks its images reviewed too) go through a ``ReviewSink``, duplicate marks (keep one
image of a near-duplicate group, mark the rest) through a ``DuplicateSink``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from pathlib import Path
from typing import Protocol

from PySide6.QtGui import QUndoCommand

from fewshot_studio.gui.models.classes import ClassListModel
from fewshot_studio.gui.project_io import ClassSpec


class CorrectionSink(Protocol):
    def apply_corrections(self, changes: Mapping[Path, str | None]) -> None:
        """Set (label) or clear (None) the correction of each path, then relabel."""


class ReviewSink(Protocol):
    def review_marks(self, paths: Iterable[Path] | None = None) -> dict[Path, str | None]:
        """The review marks (path -> accepted verdict) of those ``paths`` that have one."""

    def update_reviewed(self, marks: Mapping[Path, str | None],
                        clear: Collection[Path] = ()) -> None:
        """Set the review marks of ``marks``, remove those of ``clear``."""


class DuplicateSink(Protocol):
    def duplicate_marks(self, paths: Iterable[Path] | None = None) -> dict[Path, Path]:
        """Marked duplicate -> the image kept in its place, for those ``paths`` marked."""

    def update_duplicate_marks(self, changes: Mapping[Path, Path | None]) -> None:
        """Mark (-> the kept image) or unmark (None) each path."""


class _ReviewMemo:
    """The review marks of some paths before a command, to restore on undo."""

    def __init__(self, sink: ReviewSink, paths: list[Path]) -> None:
        self.sink = sink
        self.before = sink.review_marks(paths)
        self.unmarked = [p for p in paths if p not in self.before]

    def restore(self) -> None:
        self.sink.update_reviewed(self.before, self.unmarked)


class AddClassCommand(QUndoCommand):
    def __init__(self, model: ClassListModel, row: int, spec: ClassSpec) -> None:
        super().__init__(f"Add class “{spec.name}”")
        self.model, self.row, self.spec = model, row, spec

    def redo(self) -> None:
        self.model.insert(self.row, self.spec)

    def undo(self) -> None:
        self.model.remove(self.row)


class RemoveClassCommand(QUndoCommand):
    def __init__(self, model: ClassListModel, row: int) -> None:
        spec = model.spec(row)
        super().__init__(f"Remove class “{spec.name}”")
        self.model, self.row = model, row
        self.spec = ClassSpec(spec.name, spec.color, list(spec.examples))

    def redo(self) -> None:
        self.model.remove(self.row)

    def undo(self) -> None:
        self.model.insert(self.row, self.spec)


class RenameClassCommand(QUndoCommand):
    """``on_rename(old, new)`` lets the owner carry corrections over to the new name."""

    def __init__(self, model: ClassListModel, row: int, new: str,
                 on_rename: Callable[[str, str], None] | None = None) -> None:
        self.old = model.spec(row).name
        super().__init__(f"Rename “{self.old}” to “{new}”")
        self.model, self.row, self.new, self.on_rename = model, row, new, on_rename

    def _set(self, a: str, b: str) -> None:
        self.model.rename(self.row, b)
        if self.on_rename:
            self.on_rename(a, b)

    def redo(self) -> None:
        self._set(self.old, self.new)

    def undo(self) -> None:
        self._set(self.new, self.old)


class SetColorCommand(QUndoCommand):
    def __init__(self, model: ClassListModel, row: int, color: str) -> None:
        super().__init__("Change colour")
        self.model, self.row, self.new, self.old = model, row, color, model.spec(row).color

    def redo(self) -> None:
        self.model.set_color(self.row, self.new)

    def undo(self) -> None:
        self.model.set_color(self.row, self.old)


class SetExamplesCommand(QUndoCommand):
    """Replace a class's examples (covers adding and removing)."""

    def __init__(self, model: ClassListModel, row: int, examples: list[Path], text: str) -> None:
        super().__init__(text)
        self.model, self.row = model, row
        self.old = list(model.spec(row).examples)
        self.new = list(examples)

    def redo(self) -> None:
        self.model.set_examples(self.row, self.new)

    def undo(self) -> None:
        self.model.set_examples(self.row, self.old)


class CorrectCommand(QUndoCommand):
    """Correct ``paths`` to ``label``; ``previous`` holds each path's earlier correction
    (None: it had none), restored on undo. With a ``reviewer`` the paths are also marked
    reviewed (and their earlier review marks come back on undo)."""

    def __init__(self, sink: CorrectionSink, paths: list[Path], label: str,
                 previous: Mapping[Path, str | None],
                 reviewer: ReviewSink | None = None) -> None:
        n = len(paths)
        super().__init__(f"Correct {n} image{'s' if n != 1 else ''} to “{label}”")
        self.sink, self.paths, self.label = sink, list(paths), label
        self.previous = dict(previous)
        self.review = _ReviewMemo(reviewer, self.paths) if reviewer is not None else None

    def redo(self) -> None:
        if self.review is not None:
            self.review.sink.update_reviewed({p: self.label for p in self.paths})
        self.sink.apply_corrections({p: self.label for p in self.paths})

    def undo(self) -> None:
        if self.review is not None:
            self.review.restore()
        self.sink.apply_corrections(self.previous)


class AcceptCommand(QUndoCommand):
    """Accept the shown verdict of some images: ``marks`` maps each path to its verdict
    (label; None for unknown / error)."""

    def __init__(self, sink: ReviewSink, marks: Mapping[Path, str | None]) -> None:
        n = len(marks)
        super().__init__(f"Accept {n} prediction{'s' if n != 1 else ''}")
        self.marks = dict(marks)
        self.memo = _ReviewMemo(sink, list(self.marks))

    def redo(self) -> None:
        self.memo.sink.update_reviewed(self.marks)

    def undo(self) -> None:
        self.memo.restore()


class MarkDuplicatesCommand(QUndoCommand):
    """Mark images as duplicates of the one kept in their group (``changes``: path -> the
    kept image, or None to unmark it); undo brings back each path's earlier mark. Marks only:
    no file is touched."""

    def __init__(self, sink: DuplicateSink, changes: Mapping[Path, Path | None],
                 text: str) -> None:
        super().__init__(text)
        self.sink, self.changes = sink, dict(changes)
        before = sink.duplicate_marks(self.changes)
        self.before: dict[Path, Path | None] = {p: before.get(p) for p in self.changes}

    def redo(self) -> None:
        self.sink.update_duplicate_marks(self.changes)

    def undo(self) -> None:
        self.sink.update_duplicate_marks(self.before)
