"""Class edits: add / rename / recolour / remove classes and their example images, all
undoable. Dropped folders are expanded in a worker (a folder scan never runs on the UI
thread); the undo command is pushed when the scan returns."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

from PySide6.QtCore import QObject, Signal
from PySide6.QtGui import QImage, QUndoStack

from fewshot_studio import paths as app_paths
from fewshot_studio.data import scan
from fewshot_studio.data.images import is_image_path
from fewshot_studio.data.scan import scan_images
from fewshot_studio.errors import UserError
from fewshot_studio.gui.models.classes import ClassListModel
from fewshot_studio.gui.project_io import ClassSpec, next_color, unique_name
from fewshot_studio.gui.undo import (
    AddClassCommand,
    RemoveClassCommand,
    RenameClassCommand,
    SetColorCommand,
    SetExamplesCommand,
)
from fewshot_studio.gui.workers import FunctionWorker, bind_to


def expand_images(items: Sequence[Path]) -> list[Path]:
    """Image files among ``items`` (resolved), with folders scanned recursively
    (:func:`~fewshot_studio.data.scan.scan_images`: hidden skipped); UserError naming a folder
    that cannot be listed."""
    out: list[Path] = []
    for p in items:
        p = Path(p)
        if p.is_dir():
            scan = scan_images(p, recursive=True, what="folder")
            for folder, reason in scan.unreadable[:1]:
                raise UserError(f"cannot read folder {folder}: {reason}")
            out.extend(scan)
        elif p.is_file() and is_image_path(p.name):
            out.append(p)
    return [p.resolve() for p in out]


def class_folders(items: Sequence[Path]) -> list[tuple[str, list[Path]]]:
    """Classes from dropped folders, by :func:`fewshot_studio.data.scan.class_folders`' rule
    (the CLI's): a folder with class sub-folders gives one class per sub-folder holding images,
    a flat folder of images one class named after it. Items that are not folders are
    skipped; the images are resolved."""
    return [(name, [p.resolve() for p in images])
            for root in (Path(p) for p in items) if root.is_dir()
            for name, images in scan.class_folders(root).items() if images]


class ClassesController(QObject):
    message = Signal(str)  # status-bar text
    failed = Signal(str, str, str)

    def __init__(self, model: ClassListModel, stack: QUndoStack,
                 on_rename: Callable[[str, str], None] | None = None,
                 parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.model, self.stack, self.on_rename = model, stack, on_rename
        self.workers: list[FunctionWorker] = []

    # -- classes ----------------------------------------------------------------------------
    def add_class(self, name: str = "", examples: Sequence[Path] = ()) -> int:
        row = self.model.rowCount()
        name = unique_name(name or f"Class {row + 1}", self.model.names())
        spec = ClassSpec(name, next_color(self.model.colors()), list(examples))
        self.stack.push(AddClassCommand(self.model, row, spec))
        return row

    def remove_class(self, row: int) -> None:
        self.stack.push(RemoveClassCommand(self.model, row))

    def rename_class(self, row: int, name: str) -> bool:
        """False (and nothing changes) if ``name`` is empty or taken."""
        name = name.strip()
        old = self.model.spec(row).name
        if not name or name == old:
            return False
        if name in self.model.names():
            self.message.emit(f"A class named “{name}” already exists")
            return False
        self.stack.push(RenameClassCommand(self.model, row, name, self.on_rename))
        return True

    def set_color(self, row: int, color: str) -> None:
        if color != self.model.spec(row).color:
            self.stack.push(SetColorCommand(self.model, row, color))

    # -- examples -----------------------------------------------------------------------------
    def add_examples(self, row: int, items: Sequence[Path]) -> FunctionWorker:
        """Add image files / folders (expanded in a worker) to class ``row``."""
        name = self.model.spec(row).name
        w = FunctionWorker(expand_images, list(items))
        w.signals.finished.connect(lambda imgs: self._add_examples_now(name, imgs))
        return self._start(w)

    def _add_examples_now(self, name: str, images: list[Path]) -> None:
        row = self.model.row_of(name)
        if row is None:
            return
        have = self.model.spec(row).examples
        new = [p for p in dict.fromkeys(images) if p not in set(have)]
        if not new:
            self.message.emit("No new images to add (only image files are taken)")
            return
        n = len(new)
        self.stack.push(SetExamplesCommand(
            self.model, row, have + new, f"Add {n} example{'s' if n != 1 else ''} to “{name}”"))
        self.message.emit(f"Added {n} example{'s' if n != 1 else ''} to “{name}”")

    def remove_examples(self, row: int, examples: Sequence[Path]) -> None:
        drop = set(examples)
        have = self.model.spec(row).examples
        keep = [p for p in have if p not in drop]
        if len(keep) != len(have):
            n = len(have) - len(keep)
            self.stack.push(SetExamplesCommand(
                self.model, row, keep,
                f"Remove {n} example{'s' if n != 1 else ''} from “{self.model.spec(row).name}”"))

    def import_class_folders(self, items: Sequence[Path]) -> FunctionWorker:
        """One class per sub-folder of each dropped folder (in a worker); existing classes
        with the same name get the images added."""
        w = FunctionWorker(class_folders, list(items))
        w.signals.finished.connect(self._import_now)
        return self._start(w)

    def _import_now(self, found: list[tuple[str, list[Path]]]) -> None:
        if not found:
            self.message.emit("No images found in the dropped folders")
            return
        self.stack.beginMacro(f"Import {len(found)} classes")
        for name, imgs in found:
            row = self.model.row_of(name)
            if row is None:
                self.add_class(name, imgs)
            else:
                have = self.model.spec(row).examples
                self.stack.push(SetExamplesCommand(
                    self.model, row, have + [p for p in imgs if p not in set(have)],
                    f"Add examples to “{name}”"))
        self.stack.endMacro()
        total = sum(len(i) for _, i in found)
        self.message.emit(f"Imported {len(found)} classes, {total} examples")

    def paste_image(self, row: int, image: QImage) -> Path | None:
        """Save a clipboard image under the user data dir and add it to class ``row``."""
        if image.isNull():
            return None
        folder = app_paths.user_data_dir() / "pasted"
        folder.mkdir(parents=True, exist_ok=True)
        out = folder / f"pasted-{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 10**6}.png"
        if not image.save(str(out), "PNG"):
            self.failed.emit("Paste failed", f"Could not save the pasted image to {out}", "")
            return None
        self._add_examples_now(self.model.spec(row).name, [out])
        return out

    def _start(self, w: FunctionWorker) -> FunctionWorker:
        w.signals.errored.connect(bind_to(
            self, lambda e: self.failed.emit("Could not read the dropped items", str(e), "")))
        self.workers.append(w)
        del self.workers[:-20]
        return w.start()
