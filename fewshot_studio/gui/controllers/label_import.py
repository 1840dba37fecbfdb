"""File > Import labels: known labels from a ``path,label`` CSV (the app's and the CLI's own
CSV exports read back) or from a folder of class sub-folders, read by
:func:`~fewshot_studio.engine.label_files.read_known_labels` as ``fewshot-studio label
--labels`` reads them: an image in the query folder becomes a correction (and counts as
reviewed), any other existing image an example of its class, and a missing file is ignored
and counted.

The file is read in a worker; the edits are one undo step. A label that names no class of the
panel refuses the whole import, naming the classes (add or rename them first)."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QObject, Signal
from PySide6.QtGui import QUndoStack

from fewshot_studio.engine.label_files import KnownLabels, read_known_labels
from fewshot_studio.gui.controllers.labeling import LabelingController
from fewshot_studio.gui.models.classes import ClassListModel
from fewshot_studio.gui.undo import CorrectCommand, SetExamplesCommand
from fewshot_studio.gui.workers import FunctionWorker, bind_to


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"


class LabelImportController(QObject):
    message = Signal(str)  # status-bar text
    failed = Signal(str, str, str)

    def __init__(self, classes: ClassListModel, labeling: LabelingController,
                 stack: QUndoStack, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.classes, self.labeling, self.stack = classes, labeling, stack
        self.worker: FunctionWorker | None = None

    def import_labels(self, source: Path) -> FunctionWorker:
        """Read ``source`` in a worker, then apply it (:meth:`apply`)."""
        root = self.labeling.query_folder or Path(source).parent
        w = FunctionWorker(read_known_labels, Path(source), root,
                           frozenset(self.labeling.gallery.paths()))
        w.signals.finished.connect(self.apply)
        w.signals.errored.connect(bind_to(
            self, lambda e: self.failed.emit("Cannot import labels", str(e), "")))
        self.worker = w
        return w.start()

    def apply(self, found: KnownLabels) -> bool:
        """One undo step: the corrections (marked reviewed) and the new examples. False (and
        nothing changes) for labels that name no class, or when nothing is new."""
        names = self.classes.names()
        if strange := sorted(found.labels - set(names)):
            shown = ", ".join(f"“{s}”" for s in strange[:5])
            more = f" and {len(strange) - 5} more" if len(strange) > 5 else ""
            self.failed.emit(
                "Cannot import labels",
                f"{found.source.name} names {_plural(len(strange), 'class')} that the class "
                f"panel does not have: {shown}{more}. Add or rename the classes, then import "
                "again; nothing was changed.", "")
            return False
        corrections = {p: lab for p, lab in found.corrections.items()
                       if self.labeling.corrections.get(p) != lab}
        examples: dict[str, list[Path]] = {}  # label -> all its examples, the new ones last
        n_added = 0
        for label, paths in found.examples.items():
            have = self.classes.spec(names.index(label)).examples
            if new := [p for p in dict.fromkeys(paths) if p not in set(have)]:
                examples[label] = have + new
                n_added += len(new)
        note = f"; {_plural(len(found.missing), 'file')} not found, ignored" \
            if found.missing else ""
        if not corrections and not examples:
            self.message.emit(f"Nothing new in {found.source.name}: its labels are already "
                              f"in place{note}")
            return False
        self._push(found.source.name, corrections, examples)
        self.message.emit(f"Imported {_plural(len(corrections), 'correction')} and "
                          f"{_plural(n_added, 'example')} from {found.source.name}{note}")
        return True

    def _push(self, source: str, corrections: dict[Path, str],
              examples: dict[str, list[Path]]) -> None:
        self.stack.beginMacro(f"Import labels from {source}")
        by_label: dict[str, list[Path]] = {}
        for p, lab in corrections.items():
            by_label.setdefault(lab, []).append(p)
        for lab, paths in by_label.items():
            prev = {p: self.labeling.corrections.get(p) for p in paths}
            self.stack.push(CorrectCommand(self.labeling, paths, lab, prev,
                                           reviewer=self.labeling))
        for lab, all_examples in examples.items():
            row = self.classes.row_of(lab)
            assert row is not None
            self.stack.push(SetExamplesCommand(self.classes, row, all_examples,
                                               f"Add examples to “{lab}”"))
        self.stack.endMacro()
