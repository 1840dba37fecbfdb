"""Near-duplicates in the gallery: Review > Find duplicates runs the engine's finder
(:func:`~fewshot_studio.engine.duplicates.find_duplicates`, the one behind ``fewshot-studio
duplicates``: same bytes, or pixel signatures that correlate at least 0.985; signatures cached)
over the query images in a worker, with progress; the groups go to the gallery model (the
"Duplicates" filter shows each group together).

*Keep one, mark the rest* is one undo step (:class:`~fewshot_studio.gui.undo.
MarkDuplicatesCommand`): in each group one image is kept (the one selected, if one of the
group is; else one the user corrected or accepted; else the largest file, then the first by
name) and the others are marked as its duplicates. A mark is a review state, saved with the
project: exports leave marked images out. No file is ever moved or deleted."""

from __future__ import annotations

import os
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from PySide6.QtCore import QObject, Signal
from PySide6.QtGui import QUndoStack

from fewshot_studio.gui.models.gallery import GalleryModel
from fewshot_studio.gui.undo import MarkDuplicatesCommand
from fewshot_studio.gui.workers import GeneratorWorker, bind_to
from fewshot_studio.progress import Progress


@dataclass
class FoundDuplicates:
    """What a search found: ``groups`` (paths, two or more each), each member's file size,
    and how many files could not be compared (unreadable)."""

    groups: list[list[Path]]
    sizes: dict[Path, int]
    skipped: int


def find_job(paths: Sequence[Path], cache_path: Path | None) -> Iterator[Progress]:
    """Signatures (through the embedding cache), groups, then the members' file sizes (for the
    keep rule). Pool threads; yields the finder's progress, returns :class:`FoundDuplicates`."""
    from fewshot_studio.engine.cache import EmbeddingCache
    from fewshot_studio.engine.duplicates import DuplicatesResult, find_duplicates

    result = DuplicatesResult()
    with EmbeddingCache(cache_path) as cache:
        for p in find_duplicates(paths, cache=cache):
            if isinstance(p.payload, DuplicatesResult):
                result = p.payload
            yield p
    by_abs = {os.path.abspath(p): Path(p) for p in paths}  # the gallery's own path objects
    groups = [[by_abs.get(os.path.abspath(m), m) for m, _ in g.members] for g in result.groups]
    sizes = {}
    for p in (p for g in groups for p in g):
        try:
            sizes[p] = os.stat(p).st_size
        except OSError:
            sizes[p] = -1
    return FoundDuplicates(groups, sizes, len(result.skipped))


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"


class DuplicatesController(QObject):
    progress = Signal(int, int, str)  # done, total, status-bar text
    found = Signal(int)  # a search ended: number of groups
    message = Signal(str)  # status-bar text
    failed = Signal(str, str, str)

    def __init__(self, gallery: GalleryModel, stack: QUndoStack,
                 parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.gallery, self.stack = gallery, stack
        self.worker: GeneratorWorker | None = None
        self.sizes: dict[Path, int] = {}
        self.searched = False  # the groups on the gallery are from a search of these images
        gallery.modelReset.connect(self._forget)  # other images: search again

    def _forget(self) -> None:
        self.searched = False
        self.sizes = {}

    @property
    def busy(self) -> bool:
        return self.worker is not None and not self.worker.is_done

    def find(self, cache_path: Path | None) -> GeneratorWorker | None:
        """Search the gallery's images (in a worker); None if one is running or none shown."""
        paths = self.gallery.paths()
        if self.busy or not paths:
            return None
        w = GeneratorWorker(find_job, paths, cache_path)
        w.signals.yielded.connect(bind_to(
            self, lambda p: self.progress.emit(p.done, p.total or 0,
                                         f"Finding duplicates… {p.done}/{p.total or 0}")))
        w.signals.finished.connect(self._on_found)
        w.signals.errored.connect(bind_to(
            self, lambda e: self.failed.emit("Cannot look for duplicates", str(e), "")))
        self.worker = w
        return w.start()

    def _on_found(self, found: FoundDuplicates) -> None:
        self.worker = None  # not busy from here, though the pool thread may not have ended yet
        self.sizes = found.sizes
        self.searched = True
        self.gallery.set_duplicate_groups(found.groups)
        n = sum(len(g) for g in found.groups)
        text = (f"{_plural(len(found.groups), 'group')} of near-duplicates, {n} images"
                if found.groups else "No near-duplicates among these images")
        if found.skipped:
            text += f" ({found.skipped} could not be read)"
        self.message.emit(text)
        self.found.emit(len(found.groups))

    def keep_one(self, group: Sequence[Path], selected: Collection[Path],
                 reviewed: Collection[Path]) -> Path:
        """The image of ``group`` to keep: the selected one (if exactly one is), else one the
        user corrected or accepted, else the largest file, then the first by path."""
        chosen = [p for p in group if p in selected]
        if len(chosen) == 1:
            return chosen[0]
        return min(group, key=lambda p: (p not in reviewed, -self.sizes.get(p, -1), str(p)))

    def keep_one_mark_rest(self, selected: Collection[Path], reviewed: Collection[Path]
                           ) -> int:
        """Mark all but one image of every group (one undo step); the kept one is unmarked.
        Returns how many images are newly marked (0: nothing changed, nothing pushed)."""
        groups = self.gallery.duplicate_groups()
        if not groups:
            self.message.emit("No duplicate groups: Review > Find duplicates first")
            return 0
        marks = self.gallery.duplicate_marks()
        changes: dict[Path, Path | None] = {}
        for g in groups:
            kept = self.keep_one(g, set(selected), set(reviewed))
            for p in g:
                want = None if p == kept else kept
                if marks.get(p) != want:
                    changes[p] = want
        if not changes:
            self.message.emit("The duplicates are marked already")
            return 0
        n = sum(v is not None for v in changes.values())
        self.stack.push(MarkDuplicatesCommand(
            self.gallery, changes, f"Keep one of {_plural(len(groups), 'duplicate group')}"))
        total = sum(len(g) - 1 for g in groups)
        self.message.emit(f"Kept one image of each of {_plural(len(groups), 'group')}; "
                          f"{_plural(total, 'duplicate')} marked: exports leave them out "
                          "(no file is touched)")
        return n
