"""Project lifecycle: new / open / save, dirty tracking, autosave and recent projects.

The live state is spread over the class model, the labeling controller (corrections, review
marks, predictions) and the undo stack; ``snapshot()`` gathers it into a
:class:`~fewshot_studio.gui.project_io.Project` and ``apply()`` spreads a loaded one back (the
saved labels show when the folder scan ends, no Label press). Saving writes the project file
only: the embedding cache stays where it is. File I/O is in the Qt-free ``project_io``."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from PySide6.QtCore import QObject, QTimer, Signal
from PySide6.QtGui import QUndoStack

from fewshot_studio import paths as app_paths
from fewshot_studio.gui import project_io as pio
from fewshot_studio.gui.controllers.labeling import LabelingController
from fewshot_studio.gui.models.classes import ClassListModel
from fewshot_studio.gui.settings import UiSettings

log = logging.getLogger("fewshot_studio.gui")


def default_checkpoint() -> str:
    """"natural-protonet" if bundled, else the first bundled checkpoint, else ""."""
    bundled = app_paths.bundled_checkpoints()
    if "natural-protonet" in bundled:
        return "natural-protonet"
    return next(iter(bundled), "")


class ProjectController(QObject):
    changed = Signal()  # title or dirty state changed
    opened = Signal()  # a project was applied (new, open, demo, recovered)

    def __init__(self, classes: ClassListModel, labeling: LabelingController,
                 stack: QUndoStack, ui: UiSettings | None = None,
                 recent: pio.RecentProjects | None = None,
                 parent: QObject | None = None) -> None:
        super().__init__(parent)
        ui = ui or UiSettings()
        self.classes, self.labeling, self.stack, self.ui = classes, labeling, stack, ui
        self.recent = recent or pio.RecentProjects(limit=ui.max_recent)
        self.path: Path | None = None
        self._dirty_extra = False
        stack.cleanChanged.connect(lambda _c: self.changed.emit())
        labeling.corrections_changed.connect(self.mark_dirty)
        labeling.reviewed_changed.connect(self.mark_dirty)
        labeling.run_finished.connect(self.mark_dirty)  # new predictions to save
        self.autosave_timer = QTimer(self)
        self.autosave_timer.timeout.connect(self.autosave)
        if ui.autosave_seconds > 0:
            self.autosave_timer.start(ui.autosave_seconds * 1000)

    # -- state ------------------------------------------------------------------------------
    @property
    def dirty(self) -> bool:
        return self._dirty_extra or not self.stack.isClean()

    def mark_dirty(self) -> None:
        if not self._dirty_extra:
            self._dirty_extra = True
            self.changed.emit()

    @property
    def title(self) -> str:
        return self.path.stem if self.path else "Untitled"

    def snapshot(self, predictions: bool = True) -> pio.Project:
        """The live state as a project; ``predictions=False`` leaves them out (autosave: a
        recovered project's labels come back from the cache with one Label press)."""
        lab = self.labeling
        return pio.Project(classes=self.classes.specs(), query_folder=lab.query_folder,
                           corrections=dict(lab.corrections), checkpoint=lab.checkpoint,
                           settings=lab.settings, path=self.path,
                           reviewed=lab.review_marks(),
                           duplicates=lab.gallery.duplicate_marks(),
                           predictions=lab.saved_predictions() if predictions else None)

    def apply(self, project: pio.Project) -> None:
        """Make ``project`` the live state (clears undo history)."""
        self.labeling.cancel()
        self.path = project.path
        self.stack.clear()
        lab = self.labeling
        lab.set_corrections(project.corrections)  # first: marks the session stale
        self.classes.set_specs(project.classes)
        lab.set_reviewed(project.reviewed)
        lab.gallery.set_duplicate_marks(project.duplicates)
        lab.set_checkpoint(project.checkpoint or default_checkpoint())
        lab.set_settings(project.settings)
        lab.set_cache_path(pio.cache_path_for(project.path))
        lab.set_query_folder(project.query_folder, project.predictions)
        self.stack.setClean()
        self._dirty_extra = False
        self.opened.emit()
        self.changed.emit()

    # -- commands ---------------------------------------------------------------------------
    def new(self) -> None:
        pio.discard_autosave(None)
        self.apply(pio.Project(checkpoint=self.labeling.checkpoint or default_checkpoint()))

    def open(self, path: Path) -> None:
        """Open a project file (UserError if it is not one)."""
        project = pio.load_project(path)
        self.apply(project)
        self.recent.add(project.path or path)

    def open_demo(self, label: bool = True) -> None:
        """Open the bundled demo; ``label``: label it as soon as its folder is scanned (in the
        background), so it opens labeled without a Label press."""
        demo = pio.load_demo_project()
        self.apply(replace(demo, checkpoint=demo.checkpoint if demo.checkpoint in
                           app_paths.bundled_checkpoints() else default_checkpoint()))
        if label and self.labeling.checkpoint:
            self.labeling.label_when_scanned()

    def save(self, path: Path | None = None) -> Path:
        """Save to ``path`` (or the current file). UserError if it cannot be written."""
        target = path or self.path
        if target is None:
            raise ValueError("save() needs a path for an untitled project")
        old_path = self.path
        saved = pio.save_project(self.snapshot(), target)
        self.path = saved.path  # the cache stays: saving never moves or rebuilds it
        pio.discard_autosave(old_path)
        pio.discard_autosave(self.path)
        self.stack.setClean()
        self._dirty_extra = False
        if self.path:
            self.recent.add(self.path)
        self.changed.emit()
        return self.path or target

    def autosave(self) -> Path | None:
        """Write a recovery copy if there are unsaved changes."""
        if not self.dirty:
            return None
        try:
            return pio.write_autosave(self.snapshot(predictions=False))
        except OSError as e:
            log.warning("autosave failed: %s", e)
            return None

    def recoverable(self, path: Path | None) -> Path | None:
        return pio.find_autosave(path)

    def recover(self, autosave: Path) -> None:
        project = pio.load_autosave(autosave)
        self.apply(project)
        self.mark_dirty()

    def discard_recovery(self) -> None:
        pio.discard_autosave(self.path)
