"""What the menus and shortcuts do: the small dialog flows they start (open / save / export,
choosing folders and checkpoints, pasting) and the labeling toggles. The window owns one
:class:`Commands`, handing it the controllers and models it needs and a few callables;
the commands speak back through signals (status-bar messages, errors, what the toolbar should
show) and never reach into the window or its views."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from PySide6.QtCore import QObject, Signal
from PySide6.QtGui import QGuiApplication
from PySide6.QtWidgets import QFileDialog, QMessageBox, QWidget

from fewshot_studio import paths as app_paths
from fewshot_studio.engine.export import EXPORT_FORMATS
from fewshot_studio.errors import UserError
from fewshot_studio.gui.controllers.classes import ClassesController
from fewshot_studio.gui.controllers.duplicates import DuplicatesController
from fewshot_studio.gui.controllers.export import ExportController
from fewshot_studio.gui.controllers.label_import import LabelImportController
from fewshot_studio.gui.controllers.labeling import LabelingController
from fewshot_studio.gui.controllers.project import ProjectController
from fewshot_studio.gui.models.classes import ClassListModel
from fewshot_studio.gui.models.gallery import GalleryModel
from fewshot_studio.gui.project_io import PROJECT_SUFFIX
from fewshot_studio.gui.settings import last_dir, remember_dir
from fewshot_studio.gui.workers import FunctionWorker, bind_to

PROJECT_FILTER = f"FewShot Studio project (*{PROJECT_SUFFIX})"


def in_package(folder: Path) -> bool:
    """Inside the installed program (the bundled demo, checkpoints): no place for output."""
    roots = (app_paths.resources_dir(), app_paths.checkpoints_dir(),
             Path(__file__).resolve().parents[2])
    folder = folder.resolve()
    return any(folder == r.resolve() or r.resolve() in folder.parents for r in roots)


class Commands(QObject):
    message = Signal(str, int)  # status-bar text, milliseconds (0: until replaced)
    failed = Signal(str, str, str)  # title, message, details
    recent_changed = Signal()  # the recent-projects list changed (a save)
    counts_changed = Signal()  # what the class cards count as corrected examples changed
    checkpoint_changed = Signal(str)  # the checkpoint in use now (not loaded yet)
    checkpoint_kept = Signal(str)  # a checkpoint dialog was cancelled: still this one
    adaptive_rule_changed = Signal(bool)  # Label > Adaptive unknown rule switched

    def __init__(self, parent: QWidget, labeling: LabelingController,
                 project: ProjectController, classes: ClassListModel,
                 classes_ctl: ClassesController, export: ExportController,
                 label_import: LabelImportController, duplicates: DuplicatesController,
                 gallery: GalleryModel, current_class: Callable[[], int],
                 selected: Callable[[], list[Path]], ask_unsaved: Callable[[], str]) -> None:
        super().__init__(parent)
        self.parent_widget = parent  # dialogs open over it
        self.labeling, self.project, self.classes = labeling, project, classes
        self.classes_ctl, self.export_ctl, self.gallery = classes_ctl, export, gallery
        self.label_import, self.duplicates, self.selected = label_import, duplicates, selected
        self.current_class, self.ask_unsaved = current_class, ask_unsaved
        self.onnx_import: FunctionWorker | None = None  # Open checkpoint on an .onnx file

    def _report(self, title: str, message: str) -> None:
        self.failed.emit(title, message, "")

    def start_dir(self, kind: str = "project",
                  order: tuple[str, ...] = ("last", "project", "query")) -> str:
        """Where a file dialog of ``kind`` opens: the first existing folder in ``order`` of
        "last" (the folder last chosen in a dialog of that kind, kept in QSettings),
        "project" (the project file's folder) and "query" (the query folder), else home;
        never a folder inside the program itself (the bundled demo's)."""
        folders = {"last": last_dir(kind), "query": self.labeling.query_folder,
                   "project": self.project.path.parent if self.project.path else None}
        for c in (folders[k] for k in order):
            if c is not None and c.is_dir() and not in_package(c):
                return str(c)
        return os.path.expanduser("~")

    # -- projects ---------------------------------------------------------------------------
    def maybe_keep_changes(self) -> bool:
        """True if it is fine to drop the current project (saved, or the user said so)."""
        if not self.project.dirty:
            return True
        answer = self.ask_unsaved()
        if answer == "save":
            return self.save()
        return answer == "discard"

    def new_project(self) -> None:
        if self.maybe_keep_changes():
            self.project.new()

    def open_project(self, path: Path | None = None) -> None:
        if not self.maybe_keep_changes():
            return
        if path is None:
            f, _ = QFileDialog.getOpenFileName(self.parent_widget, "Open project",
                                               self.start_dir(), PROJECT_FILTER)
            if not f:
                return
            path = Path(f)
            remember_dir("project", path)
        try:
            rec = self.project.recoverable(path)
            self.project.open(path)
            if rec and QMessageBox.question(
                    self.parent_widget, "Recover changes?", "This project has unsaved changes "
                    "from an earlier session. Recover them?") == QMessageBox.StandardButton.Yes:
                self.project.recover(rec)
        except UserError as e:
            self._report("Cannot open the project", str(e))

    def open_demo(self) -> None:
        if self.maybe_keep_changes():
            try:
                self.project.open_demo()
            except UserError as e:
                self._report("Cannot open the demo", str(e))

    def save(self, ask: bool = False) -> bool:
        target = self.project.path
        if ask or target is None:
            f, _ = QFileDialog.getSaveFileName(self.parent_widget, "Save project",
                                               self.start_dir(), PROJECT_FILTER)
            if not f:
                return False
            target = Path(f)
            remember_dir("project", target)
        try:
            saved = self.project.save(target)
        except UserError as e:
            self._report("Cannot save", str(e))
            return False
        self.message.emit(f"Saved {saved}", 5000)
        self.recent_changed.emit()
        return True

    # -- inputs ----------------------------------------------------------------------------
    def set_query_folder(self, folder: Path) -> None:
        self.labeling.set_corrections({})
        self.labeling.set_query_folder(Path(folder))
        self.project.mark_dirty()
        self.message.emit(f"Scanning {folder}…", 0)

    def choose_query_folder(self) -> None:
        start = self.start_dir("query", ("query", "last", "project"))
        d = QFileDialog.getExistingDirectory(self.parent_widget,
                                             "Choose the folder of images to label", start)
        if d:
            remember_dir("query", Path(d))
            self.set_query_folder(Path(d))

    def import_class_folders(self) -> None:
        """File > Import class folders…: one class per sub-folder of the chosen folder (the
        same code path as a folder dropped on the class panel)."""
        d = QFileDialog.getExistingDirectory(
            self.parent_widget,
            "Import class folders: choose the folder whose sub-folders are the classes",
            self.start_dir("classes"))
        if d:
            remember_dir("classes", Path(d))
            self.classes_ctl.import_class_folders([Path(d)])

    def import_labels(self, kind: str) -> None:
        """File > Import labels: ``kind`` "csv" (a path,label CSV) or "folders" (a folder of
        class folders); query images become corrections, others examples (one undo step)."""
        start = self.start_dir("labels", ("last", "query", "project"))
        if kind == "csv":
            f, _ = QFileDialog.getOpenFileName(self.parent_widget, "Import labels from a CSV",
                                               start, "Labels (*.csv);;All files (*)")
        else:
            f = QFileDialog.getExistingDirectory(
                self.parent_widget, "Import labels: choose the folder whose sub-folders are "
                "the classes", start)
        if f:
            remember_dir("labels", Path(f))
            self.label_import.import_labels(Path(f))

    def set_checkpoint(self, name: str) -> None:
        """The user chose a checkpoint: use it, and check it in the background (a broken
        file is reported now, not at the next Label)."""
        changed = name != self.labeling.checkpoint
        if self.labeling.set_checkpoint(name):
            self.message.emit("Model changed: the labels were cleared; press Label (Ctrl+L) "
                              "to label with the new one", 0)
        self.checkpoint_changed.emit(name)
        if changed:
            self.labeling.check_checkpoint(name)
        self.project.mark_dirty()

    def open_checkpoint(self) -> None:
        """A checkpoint file, or an ONNX image encoder: imported first
        (:meth:`import_onnx`)."""
        f, _ = QFileDialog.getOpenFileName(
            self.parent_widget, "Open checkpoint", self.start_dir("checkpoint"),
            "Checkpoints and ONNX image encoders (*.safetensors *.onnx);;"
            "Checkpoints (*.safetensors);;ONNX image encoders (*.onnx)")
        if f:
            remember_dir("checkpoint", Path(f))
            if Path(f).suffix.lower() == ".onnx":
                self.import_onnx(Path(f))
            else:
                self.set_checkpoint(f)
        else:
            self.checkpoint_kept.emit(self.labeling.checkpoint)

    def import_onnx(self, path: Path) -> FunctionWorker:
        """Turn an ONNX image encoder into a checkpoint in the user data folder (in a worker;
        the model is run once to check it), then use it."""
        from fewshot_studio.io.backbone_import import import_onnx_into

        self.message.emit(f"Importing {path.name}…", 0)
        w = FunctionWorker(import_onnx_into, path, app_paths.user_data_dir() / "imported")
        w.signals.finished.connect(bind_to(self, lambda out: self._imported(path, out)))
        w.signals.errored.connect(bind_to(self, self._import_failed))
        self.onnx_import = w
        return w.start()

    def _imported(self, source: Path, checkpoint: Path) -> None:
        self.set_checkpoint(str(checkpoint))
        self.message.emit(f"Imported {source.name} as {checkpoint}; its input settings come "
                          "from the model (fewshot-studio import-backbone sets them by hand)",
                          0)

    def _import_failed(self, error: BaseException) -> None:
        self.checkpoint_kept.emit(self.labeling.checkpoint)
        self.failed.emit("Cannot use this ONNX model", str(error),
                         "fewshot-studio import-backbone MODEL.onnx --out X.safetensors "
                         "--image-size N --mean R G B --std R G B gives its input settings "
                         "by hand; then open X.safetensors.")

    def paste(self) -> None:
        img = QGuiApplication.clipboard().image()
        if self.classes.rowCount() == 0:
            self.message.emit("Add a class first, then paste", 4000)
        elif img.isNull():
            self.message.emit("The clipboard holds no image", 4000)
        else:
            self.classes_ctl.paste_image(self.current_class(), img)

    # -- outputs ---------------------------------------------------------------------------
    def export(self, kind: str) -> None:
        """Export the labels (``kind``: a key of ``EXPORT_FORMATS``, or "copy" for class
        folders); images marked as duplicates are left out."""
        preds = self.gallery.predictions()
        root = self.labeling.query_folder
        if not preds or root is None:
            self._report("Nothing to export", "Label the images first (Ctrl+L).")
            return
        marked = self.gallery.duplicate_marks()
        preds = [p for p in preds if p.path not in marked]
        note = f" (left out {len(marked)} marked duplicates)" if marked else ""
        start = self.start_dir(f"export-{kind}", ("last", "query", "project"))
        if kind == "copy":
            d = QFileDialog.getExistingDirectory(self.parent_widget,
                                                 "Copy images into class folders under…", start)
            if d:
                remember_dir("export-copy", Path(d))
                self.export_ctl.copy_to_folders(preds, Path(d), note)
            return
        fmt = EXPORT_FORMATS[kind]
        f, _ = QFileDialog.getSaveFileName(self.parent_widget,
                                           f"Export {fmt.title.split(' (')[0]}",
                                           str(Path(start) / f"labels{fmt.suffix}"), fmt.title)
        if f:
            remember_dir(f"export-{kind}", Path(f))
            self.export_ctl.export_file(kind, preds, Path(f), root, self.classes.names(),
                                        note)

    # -- near-duplicates ---------------------------------------------------------------------
    def find_duplicates(self) -> None:
        """Review > Find duplicates: search the gallery's images in the background."""
        if self.duplicates.find(self.labeling.cache_path) is None and \
                not self.gallery.rowCount():
            self.message.emit("Choose a query folder first: no images to compare", 5000)

    def keep_one_mark_rest(self) -> None:
        """Review > Keep one, mark the rest (one undo step; no file is touched)."""
        self.duplicates.keep_one_mark_rest(self.selected(), self.labeling.reviewed_paths())

    # -- labeling toggles -------------------------------------------------------------------
    def toggle(self, field: str) -> None:
        """Flip a boolean labeling setting (``LabelSettings.<field>``)."""
        s = self.labeling.settings
        self.labeling.set_settings(replace(s, **{field: not getattr(s, field)}))
        self.project.mark_dirty()
        if field == "corrections_join_support":
            self.counts_changed.emit()

    def toggle_unknown_rule(self) -> None:
        s = self.labeling.settings
        rule = "threshold" if s.unknown_rule == "adaptive" else "adaptive"
        self.labeling.set_settings(replace(s, unknown_rule=rule))
        self.adaptive_rule_changed.emit(rule == "adaptive")
        self.project.mark_dirty()

    def toggle_finetune(self) -> None:
        """Label > Fine-tune on my examples: ``adapt="finetune"`` when on, else "auto"; the
        labeling controller labels again (the fine-tuned copy embeds every image)."""
        s = self.labeling.settings
        self.labeling.set_settings(
            replace(s, adapt="auto" if s.adapt == "finetune" else "finetune"))
        self.project.mark_dirty()

    def toggle_int8(self) -> None:
        s = self.labeling.settings
        precision = "fp32" if s.precision == "int8" else "int8"
        self.labeling.set_settings(replace(s, precision=precision))
        self.project.mark_dirty()
