"""The main window: builds the models, controllers and views and wires their signals.
Behaviour lives in the controllers (what the menus do: :class:`.controllers.commands.Commands`);
the menus and shortcuts are built in :mod:`.actions`."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from PySide6.QtCore import QItemSelection, Qt, QTimer, Signal
from PySide6.QtGui import QCloseEvent, QResizeEvent, QShowEvent, QUndoStack
from PySide6.QtWidgets import (
    QAbstractSpinBox,
    QLabel,
    QLineEdit,
    QMainWindow,
    QMessageBox,
    QProgressBar,
    QPushButton,
    QSplitter,
    QTextEdit,
    QVBoxLayout,
    QWidget,
)

from fewshot_studio import paths as app_paths
from fewshot_studio.engine.api import Status
from fewshot_studio.gui import actions, gc_guard
from fewshot_studio.gui.controllers import embedding_map
from fewshot_studio.gui.controllers.classes import ClassesController
from fewshot_studio.gui.controllers.commands import Commands
from fewshot_studio.gui.controllers.duplicates import DuplicatesController
from fewshot_studio.gui.controllers.export import ExportController
from fewshot_studio.gui.controllers.label_import import LabelImportController
from fewshot_studio.gui.controllers.labeling import LabelingController
from fewshot_studio.gui.controllers.project import ProjectController
from fewshot_studio.gui.controllers.review import ReviewController
from fewshot_studio.gui.controllers.session_host import SessionFactory
from fewshot_studio.gui.excepthook import show_error_dialog
from fewshot_studio.gui.models.classes import ClassListModel
from fewshot_studio.gui.models.gallery import GalleryModel, GalleryProxy, Role
from fewshot_studio.gui.settings import UiSettings, restore_window_state, save_window_state
from fewshot_studio.gui.thumbnails import ThumbnailCache
from fewshot_studio.gui.views.class_panel import ClassPanel
from fewshot_studio.gui.views.detail import DetailPane
from fewshot_studio.gui.views.gallery import THUMB_BOX, GalleryView
from fewshot_studio.gui.views.toolbar import MainToolBar, ReviewBar


class MainWindow(QMainWindow):
    closing = Signal()

    def __init__(self, session_factory: SessionFactory | None = None,
                 ui: UiSettings | None = None, restore_state: bool = True) -> None:
        super().__init__()
        gc_guard.install()  # cyclic GC on this thread only, never in a worker
        self.setWindowTitle("FewShot Studio")
        self.resize(1360, 820)
        self.ui = ui = ui or UiSettings()
        # Dialog hooks (tests replace them): errors, guidance, the unsaved-changes question.
        self.show_error = show_error_dialog
        self.show_info = lambda title, text: QMessageBox.information(self, title, text)
        self.ask_unsaved = self._ask_unsaved
        self._finetune_why = ("", "")  # the last checkpoint checked, why it cannot fine-tune
        # -- models and controllers ----------------------------------------------------
        self.thumbs = ThumbnailCache(ui.thumbnail_px, ui.thumbnail_cache, ui.thumbnail_threads,
                                     parent=self, box=THUMB_BOX)
        self.stack = QUndoStack(self)
        self.classes = ClassListModel(self)
        self.gallery_model = GalleryModel(self.thumbs, self.classes.color_of, self)
        self.proxy = GalleryProxy(self)
        self.proxy.setSourceModel(self.gallery_model)
        self.labeling = LabelingController(self.gallery_model, self.classes, session_factory,
                                           parent=self)
        self.classes_ctl = ClassesController(self.classes, self.stack,
                                             self.labeling.rename_class, self)
        self.project = ProjectController(self.classes, self.labeling, self.stack, ui,
                                         parent=self)
        self.export = ExportController(self)
        self.label_import = LabelImportController(self.classes, self.labeling, self.stack, self)
        self.duplicates = DuplicatesController(self.gallery_model, self.stack, self)
        self.commands = Commands(self, self.labeling, self.project, self.classes,
                                 self.classes_ctl, self.export, self.label_import,
                                 self.duplicates, self.gallery_model,
                                 lambda: self.class_panel.current_row,
                                 lambda: self.reviewing.selected_paths(),
                                 lambda: self.ask_unsaved())
        # -- views -----------------------------------------------------------------------
        self.gallery = GalleryView()
        self.gallery.setModel(self.proxy)
        self.reviewing = ReviewController(self.gallery_model, self.proxy,
                                          self.gallery.selectionModel(), self.labeling,
                                          self.classes, self.stack, self)
        self.class_panel = ClassPanel(self.classes, self.classes_ctl, self.thumbs,
                                      self.correct_paths, self)
        self.acts = actions.build(self, self.commands, self.stack, self.reviewing,
                                  self.labeling.label, self.labeling.cancel,
                                  self.class_panel.add_class_and_edit)
        self.toolbar = MainToolBar(self.acts.label, self)
        self.addToolBar(self.toolbar)
        self.review = ReviewBar()
        self.detail = DetailPane(self.classes.color_of)
        center = QWidget()
        center.setObjectName("centralArea")
        cl = QVBoxLayout(center)
        cl.setContentsMargins(0, 0, 0, 0)
        cl.setSpacing(0)
        cl.addWidget(self.review)
        cl.addWidget(self.gallery, 1)
        self.splitter = QSplitter(Qt.Orientation.Horizontal)
        self.splitter.addWidget(self.class_panel)
        self.splitter.addWidget(center)
        self.splitter.addWidget(self.detail)
        self.splitter.setSizes([310, 740, 310])
        self.splitter.setStretchFactor(1, 1)
        self.splitter.setChildrenCollapsible(False)
        # The side panels follow the window's width until the user drags a splitter handle
        # (or a saved layout is restored): narrower on a small screen, so that the gallery
        # keeps three columns at 1024 px.
        self.split_by_user = False
        self.splitter.splitterMoved.connect(lambda *_: setattr(self, "split_by_user", True))
        self.setCentralWidget(self.splitter)
        self._build_status_bar()
        self._wire()
        self.embedding_map = embedding_map.install(self)  # dock + find similar
        self.toolbar.set_checkpoints(app_paths.bundled_checkpoints(), "")
        if restore_state and (sp := restore_window_state(self)) is not None:
            self.split_by_user = self.splitter.restoreState(sp)
        self._counts_timer = QTimer(self, singleShot=True, interval=150)
        self._counts_timer.timeout.connect(self._update_counts)
        self.project.new()
        self.labeling.warm_up()
        self.gallery.setFocus()  # the review keys work from the start

    def showEvent(self, e: QShowEvent) -> None:
        super().showEvent(e)
        if not e.spontaneous():  # shown by the app, not restored from minimised
            self.focus_gallery()

    def resizeEvent(self, e: QResizeEvent) -> None:
        super().resizeEvent(e)
        if not getattr(self, "split_by_user", True):  # (unset early in __init__)
            self.fit_panels()

    def fit_panels(self) -> None:
        """Side panels of 23 % of the width each (at least 250 px for the classes, whose
        names must fit, and 230 for the details; at most 340), the gallery the rest."""
        total = sum(self.splitter.sizes()) or self.splitter.width()
        side = round(self.width() * 0.228)
        left, right = max(250, min(340, side)), max(230, min(340, side))
        self.splitter.setSizes([left, max(1, total - left - right), right])

    def _build_status_bar(self) -> None:
        sb = self.statusBar()
        self.progress = QProgressBar()
        self.progress.setFixedWidth(220)
        self.progress.setTextVisible(False)
        self.progress_text = QLabel()
        self.progress_text.setObjectName("hintLabel")
        # The last run's summary stays until the next run or project (a permanent widget: a
        # temporary status message would be gone after a few seconds, or at the next hover).
        self.run_summary = QLabel()
        self.run_summary.setObjectName("runSummary")
        sb.addPermanentWidget(self.run_summary)
        self.run_summary.hide()
        self.review_count = QLabel()
        self.review_count.setObjectName("reviewCount")
        self.review_count.setToolTip("Images you accepted (Enter) or corrected (1-9); "
                                     "N jumps to the next unreviewed one")
        sb.addPermanentWidget(self.review_count)
        self.review_count.hide()
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setToolTip("Stop labeling (Esc)")
        self.cancel_button.clicked.connect(self.labeling.cancel)
        for w in (self.progress_text, self.progress, self.cancel_button):
            sb.addPermanentWidget(w)
            w.hide()

    def _wire(self) -> None:
        lab, tb = self.labeling, self.toolbar
        cmd = self.commands
        tb.checkpoint_chosen.connect(cmd.set_checkpoint)
        tb.open_checkpoint_requested.connect(self.acts.open_checkpoint.trigger)
        tb.checkpoint_chosen.connect(self.focus_gallery)
        tb.open_checkpoint_requested.connect(self.focus_gallery)
        tb.threshold_changed.connect(self._on_threshold)
        lab.busy_changed.connect(self._on_busy)
        lab.progress.connect(self._on_progress)
        lab.run_finished.connect(self._on_run_finished)
        lab.run_cancelled.connect(lambda: self.statusBar().showMessage("Labeling cancelled", 5000))
        lab.relabeled.connect(self._on_relabeled)
        lab.scanned.connect(self._on_scanned)
        lab.restored.connect(self._on_restored)
        lab.scan_warning.connect(lambda text: self.statusBar().showMessage(text, 20000))
        lab.checkpoint_checked.connect(self._on_checkpoint_checked)
        lab.finetune_checked.connect(self._on_finetune_checked)
        lab.backend_changed.connect(tb.set_backend)
        lab.failed.connect(self.report)
        lab.setup_needed.connect(self._on_setup_needed)
        lab.corrections_changed.connect(self.update_corrected_counts)
        lab.suspicious_changed.connect(self.class_panel.set_suspicious)
        cmd.message.connect(self.statusBar().showMessage)
        cmd.failed.connect(self.report)
        cmd.recent_changed.connect(self._fill_recent)
        cmd.counts_changed.connect(self.update_corrected_counts)
        cmd.checkpoint_changed.connect(self._show_checkpoint)
        cmd.checkpoint_kept.connect(
            lambda name: tb.set_checkpoints(app_paths.bundled_checkpoints(), name))
        cmd.adaptive_rule_changed.connect(tb.set_adaptive_rule)
        self.classes_ctl.message.connect(lambda m: self.statusBar().showMessage(m, 5000))
        self.classes_ctl.failed.connect(self.report)
        self.label_import.message.connect(lambda m: self.statusBar().showMessage(m, 8000))
        self.label_import.failed.connect(self.report)
        dup = self.duplicates
        dup.progress.connect(lambda d, t, m: self.statusBar().showMessage(m, 2000))
        dup.message.connect(lambda m: self.statusBar().showMessage(m, 8000))
        dup.failed.connect(self.report)
        dup.found.connect(self._on_duplicates_found)
        self.gallery_model.duplicates_changed.connect(self._on_relabeled)
        self.export.failed.connect(self.report)
        self.export.finished.connect(lambda m: self.statusBar().showMessage(m, 8000))
        self.export.progress.connect(
            lambda d, t, m: self.statusBar().showMessage(f"Exporting… {d}/{t} {m}", 2000))
        self.project.changed.connect(self._update_title)
        self.project.opened.connect(self._on_project_opened)
        self.classes.support_changed.connect(
            lambda: self.review.set_classes(self.classes.names()))
        self.classes.dataChanged.connect(lambda *_: self.gallery_model.refresh_colors())
        self.review.filter_changed.connect(self._on_filter)
        self.review.sort_changed.connect(self.proxy.set_sort)
        self.review.filter_changed.connect(self.focus_gallery)
        self.review.sort_changed.connect(self.focus_gallery)
        rv = self.reviewing
        self.gallery.correct_requested.connect(self.correct_selected)
        self.gallery.accept_requested.connect(rv.accept_selected)
        self.gallery.next_unreviewed_requested.connect(rv.next_unreviewed)
        rv.cursor_moved.connect(self.gallery.scrollTo)
        rv.message.connect(self.statusBar().showMessage)
        lab.reviewed_changed.connect(self._update_counts)
        self.gallery.folder_dropped.connect(cmd.set_query_folder)
        self.gallery.selectionModel().selectionChanged.connect(self._on_selection)
        self.proxy.modelReset.connect(self._on_selection)  # a reset drops the selection
        self.gallery_model.dataChanged.connect(lambda *_: self._counts_timer.start())
        self.gallery_model.modelReset.connect(self._update_counts)

    # -- actions ------------------------------------------------------------------------------
    def correct_selected(self, class_row: int) -> None:
        """Keys 1-9: correct the selected tiles; the cursor moves on to the next image."""
        self.reviewing.correct_selected(class_row)

    def correct_paths(self, paths: list[Path], class_row: int) -> None:
        """Tiles dropped on a class card (or any other list of images)."""
        self.reviewing.correct_paths(paths, class_row)

    def focus_gallery(self, *_: object) -> None:
        """Give the gallery the keyboard, unless the user is typing somewhere."""
        w = self.focusWidget()
        if isinstance(w, QLineEdit | QTextEdit | QAbstractSpinBox) and w.isVisible():
            return
        self.gallery.setFocus(Qt.FocusReason.OtherFocusReason)

    def report(self, title: str, message: str, details: str = "") -> None:
        self.statusBar().showMessage(message, 8000)
        self.show_error(title, message, details)

    # -- slots ----------------------------------------------------------------------------------
    def _show_checkpoint(self, name: str) -> None:
        """A checkpoint was chosen: the toolbar shows it, its backend not loaded yet."""
        self.toolbar.set_checkpoints(app_paths.bundled_checkpoints(), name)
        self.toolbar.set_backend("not loaded")

    def _fill_recent(self) -> None:
        actions.fill_recent(self.acts.recent_menu, self.project.recent.list(),
                            self.commands.open_project)

    def _on_setup_needed(self, missing: list[str]) -> None:
        """Label pressed before the job is set up: the steps to take (not an error)."""
        self.statusBar().showMessage("Set up the job first: see the steps", 8000)
        self.show_info("Set up labeling", actions.setup_guidance(self.acts, missing))

    def update_corrected_counts(self) -> None:
        """Class cards count the corrected images that join the examples."""
        self.class_panel.set_corrected_counts(self.labeling.corrected_counts())

    def _on_checkpoint_checked(self, name: str, error: str) -> None:
        if error and name == self.labeling.checkpoint:
            self.toolbar.set_backend_error(error)
            self.report("Cannot use this checkpoint", error)

    def _on_finetune_checked(self, name: str, why: str) -> None:
        """Label > Fine-tune on my examples only for a checkpoint that can be fine-tuned:
        otherwise disabled (and off), its tip saying why."""
        if name != self.labeling.checkpoint:
            return
        self._finetune_why = (name, why)
        act, lab = self.acts.finetune, self.labeling
        act.setEnabled(not why)
        act.setToolTip(why or actions.FINETUNE_TIP)
        act.setStatusTip(why or actions.FINETUNE_TIP)
        if why and lab.settings.adapt == "finetune":
            lab.set_settings(replace(lab.settings, adapt="auto"))
        act.setChecked(lab.settings.adapt == "finetune")

    def _on_threshold(self, value: float) -> None:
        self.labeling.set_threshold(value)
        self.project.mark_dirty()

    def _on_busy(self, busy: bool) -> None:
        for w in (self.progress, self.progress_text, self.cancel_button):
            w.setVisible(busy)
        self.acts.label.setEnabled(not busy)
        self.acts.cancel.setEnabled(busy)
        self.progress.setRange(0, 0)  # busy (moving) until the first image is done
        if busy:
            self.run_summary.hide()
            self.progress_text.setText("Starting…")

    def _on_progress(self, done: int, total: int, text: str) -> None:
        """``total`` 0: the model is loading (a busy bar), else a determinate bar."""
        if total:
            self.progress.setRange(0, total)
            self.progress.setValue(done)
        else:
            self.progress.setRange(0, 0)
        self.progress_text.setText(text)

    def _on_run_finished(self, s: dict[str, Any]) -> None:
        self.proxy.refresh()
        self._update_counts()
        self.reviewing.select_first_if_none()
        self.focus_gallery()
        text = (f"Labeled {s['labeled']} · unknown {s['unknown']} · errors {s['errors']} "
                f"in {s['seconds']:.1f} s")
        if s.get("load_seconds", 0) >= 0.5:
            text += f" (model load {s['load_seconds']:.1f} s)"
        self.statusBar().clearMessage()
        self.run_summary.setText(text)
        self.run_summary.setToolTip("The last labeling run")
        self.run_summary.show()

    def _on_relabeled(self) -> None:
        if self.proxy.filter != "all" or self.proxy.by_confidence:
            self.proxy.refresh()
            if (cur := self.gallery.currentIndex()).isValid():
                self.gallery.scrollTo(cur)  # the re-sort moved the cursor's tile: follow it
        self._update_counts()
        self._on_selection()

    def _on_scanned(self, n: int) -> None:
        self.statusBar().showMessage(f"{n} images in {self.labeling.query_folder}", 5000)
        self.proxy.refresh()

    def _on_restored(self, n: int, message: str) -> None:
        self.statusBar().showMessage(message, 10000)
        if n:
            self.reviewing.select_first_if_none()

    def _on_filter(self, mode: str) -> None:
        self.proxy.set_filter(mode)
        self._update_counts()
        if mode == "duplicate" and not self.duplicates.searched:
            self.commands.find_duplicates()

    def _on_duplicates_found(self, n_groups: int) -> None:
        """A search ended: show the groups (the Duplicates filter), or say there are none."""
        if n_groups and self.proxy.filter != "duplicate":
            self.review.show_filter("duplicate")
            self._on_filter("duplicate")
        self.proxy.refresh()
        self._update_counts()

    def _on_selection(self, *_: QItemSelection) -> None:
        rows = self.gallery.selectionModel().selectedIndexes()
        cur = self.gallery.currentIndex()
        if not rows:
            self.detail.show_prediction(None, None)
            return
        ix = cur if cur.isValid() and cur in rows else rows[0]
        self.detail.show_prediction(Path(ix.data(Role.PATH)), ix.data(Role.PREDICTION),
                                    len(rows))

    def _on_project_opened(self) -> None:
        lab = self.labeling
        self.toolbar.set_checkpoints(app_paths.bundled_checkpoints(), lab.checkpoint)
        self.toolbar.set_threshold(lab.settings.unknown_threshold)
        self.toolbar.set_adaptive_rule(lab.settings.unknown_rule == "adaptive")
        self.toolbar.set_backend("not loaded")
        self.review.set_classes(self.classes.names())
        self.acts.join_support.setChecked(lab.settings.corrections_join_support)
        self.acts.transductive.setChecked(lab.settings.transductive)
        self.acts.adaptive_unknown.setChecked(lab.settings.unknown_rule == "adaptive")
        if self._finetune_why[0] == lab.checkpoint:  # else its check is on the way
            self._on_finetune_checked(*self._finetune_why)
        self.acts.finetune.setChecked(lab.settings.adapt == "finetune")
        self.acts.tta.setChecked(lab.settings.tta)
        self.acts.int8.setChecked(lab.settings.precision == "int8")
        self._fill_recent()
        self.update_corrected_counts()
        self.run_summary.hide()  # it was about the previous project
        self.focus_gallery()
        if self.classes.rowCount() == 0:
            self.statusBar().showMessage(
                "Ready: add classes with “+ Class”, then choose a folder of images to label")

    def _update_counts(self) -> None:
        m = self.gallery_model
        n = m.rowCount()
        preds = m.predictions()
        parts = [f"{n} images"]
        if preds:
            parts.append(f"{sum(p.status == Status.OK for p in preds)} labeled")
            parts.append(f"{sum(p.status == Status.UNKNOWN for p in preds)} unknown")
            if corrected := sum(p.corrected for p in preds):
                parts.append(f"{corrected} corrected")
            if errors := sum(p.status == Status.ERROR for p in preds):
                parts.append(f"{errors} errors")
        if marked := len(m.duplicate_marks()):
            parts.append(f"{marked} marked duplicates")
        if self.proxy.filter != "all":
            parts.append(f"showing {self.proxy.rowCount()}")
        self.review.set_counts(" · ".join(parts))
        reviewed, total = self.reviewing.counts()
        self.review_count.setText(f"reviewed {reviewed} / {total}")
        self.review_count.setVisible(bool(preds))

    def _update_title(self) -> None:
        self.setWindowTitle(f"{self.project.title}[*] — FewShot Studio")  # [*]: modified mark
        self.setWindowModified(self.project.dirty)

    # -- closing -------------------------------------------------------------------------------
    def _ask_unsaved(self) -> str:
        """"save", "discard" or "cancel"."""
        b = QMessageBox.question(
            self, "Unsaved changes",
            f"Save the changes to “{self.project.title}” before closing?",
            QMessageBox.StandardButton.Save | QMessageBox.StandardButton.Discard
            | QMessageBox.StandardButton.Cancel, QMessageBox.StandardButton.Save)
        return {QMessageBox.StandardButton.Save: "save",
                QMessageBox.StandardButton.Discard: "discard"}.get(b, "cancel")

    def closeEvent(self, e: QCloseEvent) -> None:
        if not self.commands.maybe_keep_changes():
            e.ignore()
            return
        save_window_state(self, self.splitter.saveState())
        self.project.discard_recovery()
        self.labeling.shutdown()
        self.thumbs.clear()
        self.closing.emit()
        e.accept()
