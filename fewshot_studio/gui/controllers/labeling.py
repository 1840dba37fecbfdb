"""Labeling: drives the engine's ``LabelingSession`` from a single background thread.

Every engine call (session creation, ``set_support``, ``run``, ``correct``, ``set_settings``,
``scan_images``, ``close``) happens inside a job on ``self.pool``, a one-thread pool, so calls
are serialised (the session is not thread-safe) and the UI thread never waits on a model.
Results arrive as signals: streamed batches go straight into the gallery model.
Folder scans and checkpoint checks (``check_checkpoint``: a broken file is named when chosen)
run in the global pool. A run's progress reports a busy phase (model load, class examples)
before the first image, and its rate and ETA start at the first embedded batch.

The review state (which images the user accepted or corrected) is GUI-side only: review marks
in the gallery model, read and written through ``review_marks`` / ``set_reviewed`` /
``update_reviewed`` / ``reviewed_paths`` here (what a project file saves and restores).

Saved predictions (a project's) come back through ``set_query_folder(folder, saved)``: the
background scan also checks them (the checkpoint's identity, each file's size and time, see
``project_io.stamp_matches``) and the gallery fills with the paths and the labels still
current at once, without the engine. The first change that needs the engine (a correction,
an example, a setting) then starts a run in the background, which reads every feature from the
embedding cache. ``saved_predictions`` is what a project saves.

The session itself lives in a :class:`~.session_host.SessionHost`, whose methods are the jobs;
after each run and relabel (correction, setting, support change) it reports which class
examples look like another class and ``suspicious_changed`` carries it: example -> that class.

The class examples are never labeled: the query scan leaves them out (a support folder inside
the query folder, as the CLI does), and a Label run first drops from the gallery any image
that has become an example since.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from PySide6.QtCore import QObject, QThreadPool, QTimer, Signal

from fewshot_studio.data.scan import QueryScan
from fewshot_studio.engine.api import LabelSettings, Prediction, Status
from fewshot_studio.errors import UserError
from fewshot_studio.gui.controllers.run_progress import RunProgress
from fewshot_studio.gui.controllers.session_host import (
    LabelResult,
    SessionFactory,
    SessionHost,
    check_checkpoint_file,
    checkpoint_identity,
    current_predictions,
    default_factory,
    describe_error,
    finetune_refusal,
    scan_query,
    unreadable_note,
)
from fewshot_studio.gui.models.classes import ClassListModel
from fewshot_studio.gui.models.gallery import GalleryModel
from fewshot_studio.gui.saved_predictions import NO_STAMP, SavedPredictions, Stamp
from fewshot_studio.gui.workers import FunctionWorker, GeneratorWorker, Worker, bind_to
from fewshot_studio.progress import Progress


class LabelingController(QObject):
    busy_changed = Signal(bool)  # a labeling run started / ended
    # done, total (0: not known yet, a busy bar), text ("123/2000 · 45 img/s · ETA 00:31")
    progress = Signal(int, int, str)
    # summary: labeled, unknown, errors, corrected, seconds, load_seconds (model load and
    # class examples, before the first image; not part of the rate)
    run_finished = Signal(dict)
    run_cancelled = Signal()
    relabeled = Signal()  # predictions changed after a correction / threshold / support edit
    scanned = Signal(int)  # query folder scanned: number of images
    backend_changed = Signal(str)
    failed = Signal(str, str, str)  # title, message, details (traceback; "" for UserError)
    corrections_changed = Signal()
    reviewed_changed = Signal()  # review marks changed (accept, correction, undo, reset)
    restored = Signal(int, str)  # saved predictions shown after a scan: count, status line
    scan_warning = Signal(str)  # sub-folders of the query folder that could not be read
    # Label pressed before the job is set up: what is missing, of "classes" (at least two,
    # each with an example), "images" (a query folder with images), "model" (a checkpoint)
    setup_needed = Signal(list)
    checkpoint_checked = Signal(str, str)  # checkpoint, "" if usable, else a one-line error
    finetune_checked = Signal(str, str)  # checkpoint, "" if it can be fine-tuned, else why not
    # {example path: the class it looks like} after each run / relabel ({}: none, or no model);
    # emitted from the engine thread (queued to the UI thread's receivers)
    suspicious_changed = Signal(object)

    def __init__(self, gallery: GalleryModel, classes: ClassListModel,
                 session_factory: SessionFactory | None = None,
                 scan: Callable[[Path, bool, Collection[Path]], QueryScan] | None = None,
                 parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.gallery, self.classes = gallery, classes
        self.scan_fn = scan or scan_query
        self.pool = QThreadPool(self)
        self.pool.setMaxThreadCount(1)
        self.pool.setExpiryTimeout(-1)
        self.checkpoint = ""
        self.settings = LabelSettings()
        self.cache_path: Path | None = None
        self.query_folder: Path | None = None
        self.corrections: dict[Path, str] = {}
        self.backend = ""
        # the cache key of the features the last completed run stored (read in the engine
        # thread after it): what the embedding map and find-similar look features up under;
        # "" before a run with this checkpoint
        self.feature_id = ""
        self.workers: list[Worker] = []  # every job started (tests inspect threads)
        # touched only inside jobs (pool thread)
        self.host = SessionHost(session_factory or default_factory, self.backend_changed.emit,
                                self.suspicious_changed.emit)
        self._labeled = False  # a complete run with the current support/session
        self._restored = False  # the gallery shows a project's saved predictions, no run yet
        self._pending: SavedPredictions | None = None  # saved ones awaiting their scan
        self._pred_id = ""  # checkpoint identity of the predictions shown
        self._stamps: dict[Path, Stamp] = {}  # file stamps of the predictions shown
        self._scan_gen = 0  # only the latest scan's result is applied
        self._scan_examples: set[str] = set()  # the examples the current scan leaves out
        self._label_on_scan = False  # label as soon as the current scan ends (the demo)
        self._stale = False  # edits arrived during a run: relabel when it ends
        self._rerun = False  # the features changed during a run (fine-tuning): run again
        self._run: GeneratorWorker | None = None
        self._clock = RunProgress()  # the current run's progress line and summary
        self._relabel_timer = QTimer(self, singleShot=True, interval=250)
        self._relabel_timer.timeout.connect(self._relabel)
        classes.support_changed.connect(self._on_support_changed)
        gallery.reviewed_changed.connect(self.reviewed_changed)

    def warm_up(self) -> Worker:
        """Import the engine and its runtimes in the engine thread now: loading C extensions
        holds the GIL for a while, better at start-up than when the user presses Label."""
        return self._job(self.host.warm_up)

    # -- state ----------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return self._run is not None

    @property
    def labeled(self) -> bool:
        return self._labeled

    def set_checkpoint(self, name: str) -> bool:
        """Use another checkpoint from the next run on. Labels another model made are not
        left on screen as if current: a running run is cancelled and the shown predictions
        are cleared (corrections stay, shown as such). True if labels were cleared."""
        if name == self.checkpoint:
            return False
        had_model = bool(self.checkpoint)
        self.checkpoint, self.feature_id = name, ""
        self._labeled = self._restored = False
        self._pending = None  # saved predictions of the old model: not current any more
        if self._run is not None:
            self._run.cancel()
        self.suspicious_changed.emit({})  # the old model's verdicts
        self._job(finetune_refusal, name,  # the engine thread: shutdown waits for it
                  on_done=lambda why: self.finetune_checked.emit(name, why))
        if had_model and self.gallery.labeled_count():
            self.gallery.clear_predictions()
            self._pred_id, self._stamps = "", {}
            self._show_local(dict(self.corrections))
            return True
        return False

    def check_checkpoint(self, name: str) -> Worker:
        """Read and verify checkpoint ``name`` in the background (metadata, the weights' names
        and shapes, finite values): ``checkpoint_checked(name, error)`` reports it, so a broken
        file is named when it is chosen, not at the next Label."""
        # connected before the job starts: a quick failure must not finish unheard
        return self._job(check_checkpoint_file, name, pool=QThreadPool.globalInstance(),
                         on_done=lambda err: self.checkpoint_checked.emit(name, err or ""))

    def set_cache_path(self, path: Path | None) -> None:
        self.cache_path = path

    def set_settings(self, settings: LabelSettings) -> None:
        old, self.settings = self.settings, settings
        if "finetune" in {old.adapt, settings.adapt} and old.adapt != settings.adapt and (
                self._labeled or self._run is not None):
            self._rerun = True  # another model embeds the images: label them again
            self.cancel()
            self._label_again()
        elif settings != old and self._labeled:
            self._job(self.host.set_settings, settings, on_done=self._apply_all)
        elif settings != old:
            self._resume()

    def set_threshold(self, value: float) -> None:
        self.set_settings(replace(self.settings, unknown_threshold=value))

    def set_corrections(self, corrections: Mapping[Path, str]) -> None:
        """Replace all corrections (opening a project, a new query folder); applied by the
        next run. Clears the review and duplicate marks too: call ``set_reviewed`` (and the
        gallery's ``set_duplicate_marks``) after it to restore."""
        self.corrections = dict(corrections)
        self._labeled = self._restored = False
        self._pending = None
        self.gallery.set_review_marks({})
        self.gallery.set_duplicate_marks({})

    # -- review state (GUI-side) --------------------------------------------------------------
    def review_marks(self, paths: Iterable[Path] | None = None) -> dict[Path, str | None]:
        """Path -> the verdict the user accepted (label; None: unknown / error), for ``paths``
        that have a mark (all if None). This is the state to persist."""
        return self.gallery.review_marks(paths)

    def set_reviewed(self, marks: Mapping[Path, str | None]) -> None:
        """Replace all review marks (restoring a saved review state)."""
        self.gallery.set_review_marks(marks)

    def update_reviewed(self, marks: Mapping[Path, str | None],
                        clear: Collection[Path] = ()) -> None:
        """Set some review marks and remove others (the undo commands call this)."""
        self.gallery.update_review_marks(marks, clear)

    def reviewed_paths(self) -> set[Path]:
        """Images whose prediction still shows the verdict the user accepted or corrected."""
        return self.gallery.reviewed_paths()

    def corrected_counts(self) -> dict[str, int]:
        """Class name -> corrected images that join its examples (none when corrections do
        not join the examples)."""
        counts: dict[str, int] = {}
        if self.settings.corrections_join_support:
            for name in self.corrections.values():
                counts[name] = counts.get(name, 0) + 1
        return counts

    def rename_class(self, old: str, new: str) -> None:
        """Carry corrections and shown labels over to a renamed class (instant; the
        relabel that follows the support change confirms it)."""
        changed = {p: new for p, lab in self.corrections.items() if lab == old}
        self.corrections.update(changed)
        preds = []
        for p in self.gallery.predictions():
            top = tuple((new if lab == old else lab, pr) for lab, pr in p.top)
            if p.label == old or top != p.top:
                preds.append(replace(p, label=new if p.label == old else p.label, top=top))
        self.gallery.apply_predictions(preds)
        self.gallery.rename_review_marks(old, new)  # after: the marks agree with the labels
        if changed:
            self.corrections_changed.emit()

    def saved_predictions(self) -> SavedPredictions | None:
        """The predictions shown (or a project's, while its folder is being scanned) with
        their checkpoint identity and file stamps: what a project saves. None: none."""
        if self._pending is not None:
            return self._pending
        preds = self.gallery.predictions()
        if not preds:
            return None
        stamps = [self._stamps.get(p.path, NO_STAMP) for p in preds]
        return SavedPredictions(self._pred_id, preds, stamps, self.feature_id)

    # -- query folder -----------------------------------------------------------------------
    def set_query_folder(self, folder: Path | None,
                         saved: SavedPredictions | None = None) -> Worker | None:
        """Scan ``folder`` in the background; the gallery fills when it is done, with those of
        ``saved`` (a project's predictions) that still hold."""
        self.query_folder = folder
        self._labeled = self._restored = self._label_on_scan = False
        self._pending = saved if folder is not None else None
        self._pred_id, self._stamps = "", {}
        self._scan_gen += 1
        if folder is None:
            self.gallery.set_paths([])
            return None
        gen, checkpoint = self._scan_gen, self.checkpoint
        self._scan_examples = {str(p) for p in self._examples()}
        return self._job(self._scan_job, folder, self.settings.recursive, self._examples(),
                         saved, self.checkpoint, self.cache_path,
                         on_done=lambda r: self._on_scanned(gen, r, checkpoint),
                         pool=QThreadPool.globalInstance())

    def _examples(self) -> list[Path]:
        """Every class example (what a query scan leaves out)."""
        return [p for ps in self.classes.support().values() for p in ps]

    def _scan_job(self, folder: Path, recursive: bool, exclude: Collection[Path],
                  saved: SavedPredictions | None, checkpoint: str, cache_path: Path | None
                  ) -> tuple[QueryScan, Any]:  # global pool
        paths = self.scan_fn(folder, recursive, exclude)
        on_disk = {str(p) for p in paths}  # pathlib caches the string: set_paths is cheap
        if not saved or not saved.predictions:
            return paths, None
        ident = checkpoint_identity(checkpoint, cache_path)
        return paths, (ident, *current_predictions(saved, on_disk, ident))

    def _on_scanned(self, gen: int, result: tuple[QueryScan, Any],
                    checkpoint: str | None = None) -> None:
        if gen != self._scan_gen:
            return  # a later folder (or project) replaced this one
        paths, restored = result
        if checkpoint is not None and checkpoint != self.checkpoint:
            restored = None  # the model changed during the scan: its labels are not current
        late = {str(p) for p in self._examples()} - self._scan_examples
        self.gallery.set_paths([p for p in paths if str(p) not in late] if late else paths)
        self._pending = None
        note, fixed = "", []
        if restored is not None:
            ident, preds, stamps, note, feature_id = restored
            corr = self.corrections  # corrections may have changed during the scan
            fixed = [p if p.corrected == (p.path in corr) else
                     replace(p, corrected=not p.corrected) for p in preds]
            self.gallery.apply_predictions(fixed)
            self._pred_id, self._stamps = ident, stamps
            self._restored, self.feature_id = bool(fixed), feature_id  # the map reads it
        self.scanned.emit(len(paths))
        if warning := unreadable_note(paths):
            self.scan_warning.emit(warning)
        if note:
            self.restored.emit(len(fixed), note)
        if self._label_on_scan:
            self._label_on_scan = False
            if paths and not self.missing_setup() and not self._restored:
                self.label()

    def label_when_scanned(self) -> None:
        """Label (in the background, as Label does) as soon as the folder being scanned is in
        the gallery: the demo opens labeled."""
        self._label_on_scan = True

    def _resume(self) -> None:
        """After restoring saved predictions: the first change that needs the engine runs it
        (in the background; the embedding cache has every feature)."""
        if self._restored and self._run is None and not self._labeled \
                and not self.missing_setup():
            self.label()

    # -- labeling ---------------------------------------------------------------------------
    def label(self) -> Worker | None:
        """Label every query image (streams into the gallery). None if nothing to do."""
        if self._run is not None:
            return None
        self._drop_examples()
        paths = self.gallery.paths()
        if missing := self.missing_setup():
            self.setup_needed.emit(missing)  # guidance, not an error
            return None
        self._clock = RunProgress()
        self._restored = False
        w = self._job(self.host.label, self.checkpoint, self.cache_path, self.settings,
                      self.classes.support(), paths, dict(self.corrections),
                      on_done=self._on_label_done, on_item=self._on_label_progress,
                      start=False, generator=True)
        # connect everything before it starts: a fast run could finish before a later connect
        w.signals.cancelled.connect(self._on_cancelled)
        w.signals.done.connect(self._on_run_done)
        self._run = w
        w.start(self.pool)
        self.busy_changed.emit(True)
        return w

    def missing_setup(self) -> list[str]:
        """What a run still needs, of "classes", "images", "model" (in setup order); [] when
        Label can run."""
        support = self.classes.support()
        missing = []
        if len(support) < 2 or not all(support.values()):
            missing.append("classes")
        if not self.gallery.rowCount():
            missing.append("images")
        if not self.checkpoint:
            missing.append("model")
        return missing

    def cancel(self) -> None:
        if self._run is not None:
            self._run.cancel()

    def _on_label_progress(self, p: Progress) -> None:
        """Stream a batch into the gallery and report progress."""
        if isinstance(p.payload, list):
            self.gallery.apply_predictions(p.payload)
        self.progress.emit(*self._clock.report(p))

    def _on_label_done(self, result: LabelResult) -> None:
        preds, self._pred_id, self._stamps, self.feature_id = result
        self._labeled = True
        self._apply_all(preds)
        if self._stale:  # classes or corrections changed while the run was going
            self._stale = False
            self._relabel_timer.start()
        self.run_finished.emit(self._clock.summary(preds))

    def _on_cancelled(self) -> None:
        self._labeled = False
        self.run_cancelled.emit()

    def _label_again(self) -> None:
        if self._rerun and self._run is None:
            self._rerun = False
            self.label()

    def _on_run_done(self) -> None:
        self._run = None
        self.busy_changed.emit(False)
        self._label_again()
        if self._stale and self._labeled:
            self._stale = False
            self._relabel_timer.start()

    # -- corrections & relabeling -----------------------------------------------------------
    def apply_corrections(self, changes: Mapping[Path, str | None]) -> None:
        """Set or clear corrections (the undo commands call this), then relabel in a worker.
        Before the first run only the tiles change; the engine gets them on the next run."""
        for p, lab in changes.items():
            if lab is None:
                self.corrections.pop(p, None)
            else:
                self.corrections[p] = lab
        self.corrections_changed.emit()
        if self._run is not None:
            self._stale = True
        if self._labeled:
            self._job(self.host.correct, dict(changes), on_done=self._apply_all)
            self._show_local(changes)  # instant feedback; the worker's result follows
        else:
            self._show_local(changes)
            self._resume()

    def _show_local(self, changes: Mapping[Path, str | None]) -> None:
        preds = []
        for p, lab in changes.items():
            old = self.gallery.prediction_for(p)
            if lab is not None:
                preds.append(Prediction(p, lab, 1.0, 1.0, Status.OK,
                                        old.top if old else (), "", True))
            elif old is not None and old.corrected:
                preds.append(replace(old, corrected=False, label=None, confidence=0.0,
                                     status=Status.UNKNOWN))
        self.gallery.apply_predictions(preds)
        self.relabeled.emit()

    def _on_support_changed(self) -> None:
        if self._run is not None:
            self._stale = True
        elif self._labeled:
            self._relabel_timer.start()
        else:
            self._resume()

    def _relabel(self) -> None:
        if self._labeled and self._run is None:
            self._job(self.host.relabel, self.classes.support(), dict(self.corrections),
                      on_done=self._apply_all)

    def _drop_examples(self) -> None:
        """Class examples are not labeled: before a run, a shown image that has become one
        since the scan leaves the gallery (its correction and review mark go with it)."""
        gone = [p for p in self._examples() if self.gallery.row_of(p) is not None]
        if not gone:
            return
        self.gallery.remove_paths(gone)
        if any(self.corrections.pop(p, None) is not None for p in gone):
            self.corrections_changed.emit()

    def _apply_all(self, preds: list[Prediction] | None) -> None:
        if preds is not None:
            self.gallery.apply_predictions(preds)
        self.relabeled.emit()

    # -- plumbing ---------------------------------------------------------------------------
    def _job(self, fn: Callable[..., Any], *args: Any,
             on_done: Callable[[Any], None] | None = None,
             on_item: Callable[[Any], None] | None = None,
             pool: QThreadPool | None = None, start: bool = True,
             generator: bool = False) -> Worker:
        """Run ``fn(*args)`` in ``pool`` (the engine thread by default): a plain function in
        a :class:`FunctionWorker`, a generator of progress (``generator``) in a
        :class:`GeneratorWorker`."""
        w = (GeneratorWorker if generator else FunctionWorker)(fn, *args)
        if on_done:
            w.signals.finished.connect(bind_to(self, on_done))
        if on_item:
            w.signals.yielded.connect(bind_to(self, on_item))
        w.signals.errored.connect(self._on_error)
        self.workers.append(w)
        del self.workers[:-50]
        return w.start(pool or self.pool) if start else w

    def _on_error(self, e: BaseException) -> None:
        if isinstance(e, UserError):
            self.failed.emit("Cannot label", str(e), "")
        else:
            details = "".join(traceback.format_exception(e))
            self.failed.emit("Labeling failed", describe_error(e), details)
        self._labeled = False

    def wait(self, msecs: int = 30_000) -> bool:
        return self.pool.waitForDone(msecs)

    def shutdown(self) -> None:
        """Cancel, wait, and close the session in its own thread."""
        self.cancel()
        self._relabel_timer.stop()
        FunctionWorker(self.host.close).start(self.pool)
        self.pool.waitForDone(10_000)
