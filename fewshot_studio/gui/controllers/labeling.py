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

After each run and relabel (correction, setting, support change) the same job asks the session
which class examples look like another class (``suspicious_examples``, leave-one-out on the
cached support features) and ``suspicious_changed`` reports it: example -> that class.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import traceback
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

from PySide6.QtCore import QObject, QThreadPool, QTimer, Signal

from fewshot_studio.data.scan import QueryScan
from fewshot_studio.engine.api import LabelSettings, Prediction, Status
from fewshot_studio.errors import UserError
from fewshot_studio.gui import project_io as pio
from fewshot_studio.gui.models.classes import ClassListModel
from fewshot_studio.gui.models.gallery import GalleryModel
from fewshot_studio.gui.workers import GeneratorWorker
from fewshot_studio.progress import EtaEstimator, Progress, format_seconds

log = logging.getLogger(__name__)
class Session(Protocol):
    """What the controller uses of :class:`~fewshot_studio.engine.session.LabelingSession`
    (tests stand in for it with fakes that implement all of it). Called on the pool thread
    only."""

    settings: LabelSettings
    backend: Any
    model_id: str  # "<checkpoint identity>:<feature format>"

    def prepare(self) -> Any: ...
    def set_support(self, classes: Mapping[str, Sequence[Path]]) -> None: ...
    def support(self) -> dict[str, list[Path]]: ...
    def run(self, query_paths: Sequence[Path]) -> Iterator[Progress]: ...
    def relabel(self) -> list[Prediction]: ...
    def predictions(self) -> list[Prediction]: ...
    def set_settings(self, settings: LabelSettings) -> list[Prediction]: ...
    def correct(self, paths: Sequence[Path], label: str | None) -> list[Prediction]: ...
    def corrections(self) -> dict[Path, str]: ...
    def suspicious_examples(self) -> dict[Path, str]: ...
    def close(self) -> None: ...


SessionFactory = Callable[[str, LabelSettings, Path | None], Session]
# The engine's messages before the first image is done, as the status bar says them.
PHASES = {"embedding examples": "Reading the class examples…"}


def _default_factory(checkpoint: str, settings: LabelSettings, cache_path: Path | None) -> Any:
    from fewshot_studio.engine.session import LabelingSession

    return LabelingSession(checkpoint, settings=settings, cache_path=cache_path)


def _scan(root: Path, recursive: bool) -> QueryScan:
    from fewshot_studio.data.scan import scan_images

    return scan_images(root, recursive=recursive)


def unreadable_note(scan: QueryScan) -> str:
    """A status line naming the sub-folders a scan could not read ("" when none)."""
    if not scan.unreadable:
        return ""
    folder, reason = scan.unreadable[0]
    more = f" and {len(scan.unreadable) - 1} more" if len(scan.unreadable) > 1 else ""
    return f"Cannot read folder {folder} ({reason}){more}: its images are not in the gallery"


def _checkpoint_id(checkpoint: str, cache_path: Path | None) -> str:
    """The checkpoint's identity as the embedding cache computes it (SHA-256 of the file,
    remembered in the cache); "" if it cannot be read. Pool threads only."""
    from fewshot_studio.engine.cache import EmbeddingCache
    from fewshot_studio.paths import resolve_checkpoint

    try:
        path = resolve_checkpoint(checkpoint)
        with EmbeddingCache(cache_path) as cache:
            return cache.checkpoint_identity(path)
    except (UserError, OSError):
        return ""


def _current(saved: pio.SavedPredictions, on_disk: set[str], checkpoint_id: str
             ) -> tuple[list[Prediction], dict[Path, pio.Stamp], str]:
    """The saved predictions that still hold (same checkpoint, file unchanged), their stamps,
    and a one-line account for the status bar. Pool threads only (one stat per image)."""
    n = len(saved.predictions)
    if not checkpoint_id or checkpoint_id != saved.checkpoint_id:
        return [], {}, (f"{n} saved labels not shown: they were made with another checkpoint "
                        "(press Label)")
    keep: list[Prediction] = []
    stamps: dict[Path, pio.Stamp] = {}
    for p, stamp in zip(saved.predictions, saved.stamps, strict=True):
        if str(p.path) in on_disk and pio.stamp_matches(stamp, pio.file_stamp(p.path)):
            keep.append(p)
            stamps[p.path] = stamp
    note = f"Restored {len(keep)} saved labels"
    if len(keep) < n:
        note += f"; {n - len(keep)} not shown: the images changed or are gone (press Label)"
    return keep, stamps, note


def describe_error(e: BaseException) -> str:
    if isinstance(e, UserError):
        return str(e)
    return f"{type(e).__name__}: {e}"


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
    # {example path: the class it looks like} after each run / relabel ({}: none, or no model);
    # emitted from the engine thread (queued to the UI thread's receivers)
    suspicious_changed = Signal(object)

    def __init__(self, gallery: GalleryModel, classes: ClassListModel,
                 session_factory: SessionFactory | None = None,
                 scan: Callable[[Path, bool], list[Path]] | None = None,
                 parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.gallery, self.classes = gallery, classes
        self.session_factory = session_factory or _default_factory
        self.scan_fn = scan or _scan
        self.pool = QThreadPool(self)
        self.pool.setMaxThreadCount(1)
        self.pool.setExpiryTimeout(-1)
        self.checkpoint = ""
        self.settings = LabelSettings()
        self.cache_path: Path | None = None
        self.query_folder: Path | None = None
        self.corrections: dict[Path, str] = {}
        self.backend = ""
        self.workers: list[GeneratorWorker] = []  # every job started (tests inspect threads)
        self._session: Session | None = None  # touched only inside jobs (pool thread)
        self._session_key: tuple[str, Path | None] | None = None
        self._labeled = False  # a complete run with the current support/session
        self._restored = False  # the gallery shows a project's saved predictions, no run yet
        self._pending: pio.SavedPredictions | None = None  # saved ones awaiting their scan
        self._pred_id = ""  # checkpoint identity of the predictions shown
        self._stamps: dict[Path, pio.Stamp] = {}  # file stamps of the predictions shown
        self._scan_gen = 0  # only the latest scan's result is applied
        self._label_on_scan = False  # label as soon as the current scan ends (the demo)
        self._stale = False  # edits arrived during a run: relabel when it ends
        self._run: GeneratorWorker | None = None
        self._eta = EtaEstimator()
        self._run_start = self._first_batch = 0.0  # perf_counter times of the current run
        self._relabel_timer = QTimer(self, singleShot=True, interval=250)
        self._relabel_timer.timeout.connect(self._relabel)
        classes.support_changed.connect(self._on_support_changed)
        gallery.reviewed_changed.connect(self.reviewed_changed)

    def warm_up(self) -> GeneratorWorker:
        """Import the engine and its runtimes in the engine thread now: loading C extensions
        holds the GIL for a while, better at start-up than when the user presses Label."""
        return self._job(self._warm_job)

    @staticmethod
    def _warm_job() -> Iterator[Progress]:
        import importlib

        for name in ("fewshot_studio.engine.session", "fewshot_studio.engine.export",
                     "fewshot_studio.models", "onnxruntime"):
            with contextlib.suppress(ImportError):
                importlib.import_module(name)
        return None
        yield

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
        self.checkpoint = name
        self._labeled = self._restored = False
        self._pending = None  # saved predictions of the old model: not current any more
        if self._run is not None:
            self._run.cancel()
        self.suspicious_changed.emit({})  # the old model's verdicts
        if had_model and self.gallery.labeled_count():
            self.gallery.clear_predictions()
            self._pred_id, self._stamps = "", {}
            self._show_local(dict(self.corrections))
            return True
        return False

    def check_checkpoint(self, name: str) -> GeneratorWorker:
        """Read and verify checkpoint ``name`` in the background (metadata, the weights' names
        and shapes, finite values): ``checkpoint_checked(name, error)`` reports it, so a broken
        file is named when it is chosen, not at the next Label."""
        # connected before the job starts: a quick failure must not finish unheard
        return self._job(self._check_job, name, pool=QThreadPool.globalInstance(),
                         on_done=lambda err: self.checkpoint_checked.emit(name, err or ""))

    @staticmethod
    def _check_job(name: str) -> Iterator[Progress]:
        from fewshot_studio.io.checkpoint import load_checkpoint
        from fewshot_studio.paths import resolve_checkpoint

        try:
            load_checkpoint(resolve_checkpoint(name))
        except UserError as e:
            return str(e)
        except Exception as e:  # an unreadable file, whatever the reason: name it
            return describe_error(e)
        return ""
        yield

    def set_cache_path(self, path: Path | None) -> None:
        self.cache_path = path

    def set_settings(self, settings: LabelSettings) -> None:
        old, self.settings = self.settings, settings
        if settings != old and self._labeled:
            self._job(self._settings_job, settings, on_done=self._apply_all)
        elif settings != old:
            self._resume()

    def set_threshold(self, value: float) -> None:
        self.set_settings(replace(self.settings, unknown_threshold=value))

    def set_corrections(self, corrections: Mapping[Path, str]) -> None:
        """Replace all corrections (opening a project, a new query folder); applied by the
        next run. Clears the review marks too: call ``set_reviewed`` after it to restore."""
        self.corrections = dict(corrections)
        self._labeled = self._restored = False
        self._pending = None
        self.gallery.set_review_marks({})

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

    def saved_predictions(self) -> pio.SavedPredictions | None:
        """The predictions shown (or a project's, while its folder is being scanned) with
        their checkpoint identity and file stamps: what a project saves. None: none."""
        if self._pending is not None:
            return self._pending
        preds = self.gallery.predictions()
        if not preds:
            return None
        return pio.SavedPredictions(self._pred_id, preds,
                                    [self._stamps.get(p.path, pio.NO_STAMP) for p in preds])

    # -- query folder -----------------------------------------------------------------------
    def set_query_folder(self, folder: Path | None,
                         saved: pio.SavedPredictions | None = None) -> GeneratorWorker | None:
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
        return self._job(self._scan_job, folder, self.settings.recursive, saved,
                         self.checkpoint, self.cache_path,
                         on_done=lambda r: self._on_scanned(gen, r, checkpoint),
                         pool=QThreadPool.globalInstance())

    def _scan_job(self, folder: Path, recursive: bool, saved: pio.SavedPredictions | None,
                  checkpoint: str, cache_path: Path | None) -> Iterator[Progress]:
        yield Progress(0, None, f"Scanning {folder.name}…")
        paths = self.scan_fn(folder, recursive)
        on_disk = {str(p) for p in paths}  # pathlib caches the string: set_paths is cheap
        if not saved or not saved.predictions:
            return paths, None
        ident = _checkpoint_id(checkpoint, cache_path)
        return paths, (ident, *_current(saved, on_disk, ident))

    def _on_scanned(self, gen: int, result: tuple[QueryScan, Any],
                    checkpoint: str | None = None) -> None:
        if gen != self._scan_gen:
            return  # a later folder (or project) replaced this one
        paths, restored = result
        if checkpoint is not None and checkpoint != self.checkpoint:
            restored = None  # the model changed during the scan: its labels are not current
        self.gallery.set_paths(paths)
        self._pending = None
        note, fixed = "", []
        if restored is not None:
            ident, preds, stamps, note = restored
            corr = self.corrections  # corrections may have changed during the scan
            fixed = [p if p.corrected == (p.path in corr) else
                     replace(p, corrected=not p.corrected) for p in preds]
            self.gallery.apply_predictions(fixed)
            self._pred_id, self._stamps = ident, stamps
            self._restored = bool(fixed)
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
    def label(self) -> GeneratorWorker | None:
        """Label every query image (streams into the gallery). None if nothing to do."""
        if self._run is not None:
            return None
        paths = self.gallery.paths()
        if missing := self.missing_setup():
            self.setup_needed.emit(missing)  # guidance, not an error
            return None
        self._eta = EtaEstimator()
        self._run_start, self._first_batch = time.perf_counter(), 0.0
        self._restored = False
        w = self._job(self._label_job, self.checkpoint, self.cache_path, self.settings,
                      self.classes.support(), paths, dict(self.corrections),
                      on_done=self._on_label_done, on_item=self._on_label_progress,
                      start=False)
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

    def _session_for(self, checkpoint: str, cache_path: Path | None,
                     settings: LabelSettings) -> Any:  # pool thread
        key = (checkpoint, cache_path)
        if self._session is None or self._session_key != key:
            if self._session is not None:
                self._session.close()
            self._session = None
            self._session = self.session_factory(checkpoint, settings, cache_path)
            self._session_key = key
            self._session.prepare()  # ONNX export / runtime start, under "Loading model"
            self.backend_changed.emit(str(self._session.backend))
        elif self._session.settings != settings:
            self._session.set_settings(settings)
        return self._session

    def _label_job(self, checkpoint: str, cache_path: Path | None, settings: LabelSettings,
                   support: dict[str, list[Path]], paths: list[Path],
                   corrections: dict[Path, str]) -> Iterator[Progress]:
        if self._session is None or self._session_key != (checkpoint, cache_path):
            yield Progress(0, None, f"Loading model {Path(checkpoint).stem}…")
        s = self._session_for(checkpoint, cache_path, settings)
        s.set_support(support)
        yield from s.run(paths)
        self.backend_changed.emit(str(s.backend))
        preds = self._reconcile(s, corrections, support) or s.predictions()
        self._check_support(s, support)
        ident = s.model_id.split(":")[0]
        return preds, ident, {p: pio.file_stamp(p) for p in paths}

    @staticmethod
    def _reconcile(s: Session, wanted: dict[Path, str],
                   support: dict[str, list[Path]]) -> list[Prediction] | None:
        """Make the session's corrections equal ``wanted`` (dropping unknown class names)."""
        wanted = {p: lab for p, lab in wanted.items() if lab in support}
        have = s.corrections()
        preds = None
        for p in [p for p in have if p not in wanted]:
            preds = s.correct([p], None)
        by_label: dict[str, list[Path]] = {}
        for p, lab in wanted.items():
            if have.get(p) != lab:
                by_label.setdefault(lab, []).append(p)
        for lab, ps in by_label.items():
            preds = s.correct(ps, lab)
        return preds

    def _on_label_progress(self, p: Progress) -> None:
        """Stream a batch into the gallery and report progress. Before the first image is done
        (loading the model, embedding the class examples) the total is reported as 0 (a busy
        bar) with what is happening; the rate clock starts at the first embedded batch, so
        neither the rate nor the ETA counts the load."""
        if isinstance(p.payload, list):
            self.gallery.apply_predictions(p.payload)
        if not p.done:
            text = PHASES.get(p.message, p.message) or "Starting…"
            self.progress.emit(0, 0, text)
            return
        if not self._first_batch:
            self._first_batch = time.perf_counter()
        self._eta.update(p.done)  # the first call only sets the starting point
        parts = [f"{p.done}/{p.total}" if p.total else str(p.done)]
        if self._eta.rate:
            parts.append(f"{self._eta.rate:.0f} img/s")
        eta = self._eta.eta(p.done, p.total)
        if eta is not None:
            parts.append(f"ETA {format_seconds(eta)}")
        self.progress.emit(p.done, p.total or 0, " · ".join(parts))

    def _on_label_done(self, result: tuple[list[Prediction], str, dict[Path, pio.Stamp]]
                       ) -> None:
        preds, self._pred_id, self._stamps = result
        self._labeled = True
        self._apply_all(preds)
        if self._stale:  # classes or corrections changed while the run was going
            self._stale = False
            self._relabel_timer.start()
        summary = {
            "labeled": sum(p.status == Status.OK for p in preds),
            "unknown": sum(p.status == Status.UNKNOWN for p in preds),
            "errors": sum(p.status == Status.ERROR for p in preds),
            "corrected": sum(p.corrected for p in preds),
            "seconds": time.perf_counter() - self._run_start,
            "load_seconds": (self._first_batch or time.perf_counter()) - self._run_start,
        }
        self.run_finished.emit(summary)

    def _on_cancelled(self) -> None:
        self._labeled = False
        self.run_cancelled.emit()

    def _on_run_done(self) -> None:
        self._run = None
        self.busy_changed.emit(False)
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
            self._job(self._correct_job, dict(changes), on_done=self._apply_all)
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

    def _correct_job(self, changes: dict[Path, str | None]) -> Iterator[Progress]:
        s = self._session
        preds = None
        by_label: dict[str | None, list[Path]] = {}
        for p, lab in changes.items():
            by_label.setdefault(lab, []).append(p)
        for lab, ps in by_label.items():
            preds = s.correct(ps, lab)
        if s.settings.corrections_join_support:  # the support changed
            self._check_support(s)
        return preds
        yield

    def _settings_job(self, settings: LabelSettings) -> Iterator[Progress]:
        preds = self._session.set_settings(settings)
        self._check_support(self._session)
        return preds
        yield

    def _on_support_changed(self) -> None:
        if self._run is not None:
            self._stale = True
        elif self._labeled:
            self._relabel_timer.start()
        else:
            self._resume()

    def _relabel(self) -> None:
        if self._labeled and self._run is None:
            self._job(self._relabel_job, self.classes.support(), self.gallery.paths(),
                      dict(self.corrections), on_done=self._apply_all)

    def _relabel_job(self, support: dict[str, list[Path]], paths: list[Path],
                     corrections: dict[Path, str]) -> Iterator[Progress]:
        s = self._session
        s.set_support(support)
        preds = s.relabel()  # cached features: only new examples are embedded
        preds = self._reconcile(s, corrections, support) or preds
        self._check_support(s, support)
        return preds
        yield

    def _check_support(self, s: Session, support: Mapping[str, list[Path]] | None = None
                       ) -> None:  # pool thread
        """Emit ``suspicious_changed`` with the session's suspicious class examples, keyed by
        the paths the class panel holds (``support``: the GUI's; else the session's)."""
        try:
            found = s.suspicious_examples()
        except Exception:  # a hint, not worth losing the labels over
            log.exception("checking the class examples failed")
            return
        if support is None:
            support = s.support()
        ours = {os.path.abspath(p): p for ps in support.values() for p in ps}
        self.suspicious_changed.emit({ours.get(os.path.abspath(p), Path(p)): lab
                                      for p, lab in found.items()})

    def _apply_all(self, preds: list[Prediction] | None) -> None:
        if preds is not None:
            self.gallery.apply_predictions(preds)
        self.relabeled.emit()

    # -- plumbing ---------------------------------------------------------------------------
    def _job(self, fn: Callable[..., Iterator[Any]], *args: Any,
             on_done: Callable[[Any], None] | None = None,
             on_item: Callable[[Any], None] | None = None,
             pool: QThreadPool | None = None, start: bool = True) -> GeneratorWorker:
        w = GeneratorWorker(fn, *args)
        if on_done:
            w.signals.finished.connect(on_done)
        if on_item:
            w.signals.yielded.connect(on_item)
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

        def _close() -> Iterator[Progress]:
            if self._session is not None:
                self._session.close()
                self._session = None
            return None
            yield

        GeneratorWorker(_close).start(self.pool)
        self.pool.waitForDone(10_000)
