"""The embedding map dock and "find similar": both read the cached features of the images
(:func:`~fewshot_studio.engine.similarity.cached_features`, under the key the last labeling
run stored them under: ``LabelingController.feature_id``, which names int8 and test-time
augmentation) in a worker, never the model and never on the UI thread.

* The map (:class:`~fewshot_studio.gui.views.embedding_map.EmbeddingMapPanel`): the query
  images and the class examples, projected to 2-D in a worker (PCA at once, then UMAP where
  ``umap-learn`` is installed, in a child process that closing the window kills: see
  :mod:`~fewshot_studio.engine.projection`), coloured from
  the gallery's predictions (recoloured on every relabel, without a new projection). Hover
  shows a thumbnail, a click selects the image in the gallery (and so in Details), a
  rectangle or lasso assigns a class to its query images: one undoable correction through
  the review controller, the same path as keys 1-9, so the images join the class examples
  and everything relabels.
* Find similar: the gallery sorted by cosine similarity to one image
  (:meth:`find_similar`); "Label N most similar as…" (:meth:`label_most_similar`) is one
  undoable correction of the image and its N-1 nearest neighbours.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PySide6.QtCore import QObject, Qt, QThreadPool, QTimer, Signal
from PySide6.QtGui import QAction, QCursor, QKeySequence, QPixmap
from PySide6.QtWidgets import (
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QDockWidget,
    QFormLayout,
    QMainWindow,
    QMenu,
    QSpinBox,
    QWidget,
)

from fewshot_studio.engine.api import Status
from fewshot_studio.engine.projection import ProjectionProcess
from fewshot_studio.gui.controllers.labeling import LabelingController
from fewshot_studio.gui.controllers.review import ReviewController
from fewshot_studio.gui.models.classes import ClassListModel
from fewshot_studio.gui.models.gallery import GalleryModel, GalleryProxy, Role
from fewshot_studio.gui.thumbnails import ThumbnailCache
from fewshot_studio.gui.views.embedding_map import NO_LABEL, EmbeddingMapPanel, MapPoints
from fewshot_studio.gui.workers import GeneratorWorker, bind_to
from fewshot_studio.progress import Progress

THUMB_PX = 128  # the hover thumbnail's longest side


def _similar_job(paths: list[Path], anchor: Path, n: int, feature_id: str,
                 cache_path: Path | None) -> Iterator[Progress]:
    """Rank ``paths`` by similarity to ``anchor``: ``(paths, ranked rows (most similar
    first, rows without a feature last), the top ``n`` rows with a feature)``, or None when
    the anchor has no cached feature."""
    from fewshot_studio.engine.similarity import (
        cached_features,
        most_similar,
        rank_by_similarity,
    )

    table = cached_features(paths, feature_id, cache_path)
    row = table.row_of(anchor)
    if row is None or not table.valid[row]:
        return None
    sims = table.similarities(row)
    return (table.paths, rank_by_similarity(sims, table.valid).tolist(),
            most_similar(sims, n, table.valid).tolist())
    yield


def _map_job(paths: list[Path], feature_id: str, cache_path: Path | None,
             slow: ProjectionProcess) -> Iterator[Progress]:
    """Features -> PCA map (yielded at once) -> ``slow``'s map (UMAP, in a child process;
    returned) where it can run; returns ``(kept rows, xy, method)`` (rows without a cached
    feature are left out), or None when ``slow`` was stopped."""
    from fewshot_studio.engine.projection import pca
    from fewshot_studio.engine.similarity import cached_features

    table = cached_features(paths, feature_id, cache_path)
    rows = np.flatnonzero(table.valid)
    x = table.feats[rows]
    first = (rows, pca(x), "PCA")
    if len(rows) < 4 or not slow.ready():
        return first
    yield Progress(0, None, "projecting (UMAP)…", payload=first)
    xy = slow.run(x)
    return None if xy is None else (rows, xy, "UMAP")


class EmbeddingMapController(QObject):
    message = Signal(str, int)  # status bar text, timeout in ms
    map_ready = Signal(str)  # a projection is shown: "PCA" or "UMAP"
    similar_sorted = Signal(object)  # the gallery is sorted by similarity to this Path

    def __init__(self, panel: EmbeddingMapPanel, gallery: GalleryModel, proxy: GalleryProxy,
                 classes: ClassListModel, labeling: LabelingController,
                 reviewing: ReviewController, thumbs: ThumbnailCache,
                 parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.panel, self.canvas = panel, panel.canvas
        self.gallery, self.proxy, self.classes = gallery, proxy, classes
        self.labeling, self.reviewing, self.thumbs = labeling, reviewing, thumbs
        # Dialog hook (tests replace it): class row for N images (None: cancelled).
        self.ask_class: Callable[[int], int | None] = self._ask_class
        # "Label N most similar as…": (n, class row) for an image, None if cancelled
        self.ask_label_similar: Callable[[Path], tuple[int, int] | None] = lambda _p: None
        self.dock: QDockWidget | None = None
        self.find_action: QAction | None = None
        self.label_action: QAction | None = None
        self.paths: list[Path] = []  # one per point
        self.example_class: list[int] = []  # per point: class row of a class example, else -1
        self.method = ""
        self.workers: list[GeneratorWorker] = []  # jobs started (tests wait on them)
        # Projections get a thread of their own: UMAP can take a minute (numba compiles on
        # first use) and must not hold up folder scans in the global pool, nor find-similar.
        # The thread waits on a child process (the slow projection, kept between maps), which
        # a newer projection or closing the window kills: nothing waits for UMAP to finish.
        self.pool = QThreadPool(self)
        self.pool.setMaxThreadCount(1)
        self.slow_projection: Callable[[], ProjectionProcess] = ProjectionProcess  # tests: fakes
        self._slow: ProjectionProcess | None = None  # made on first use
        self._map_job: GeneratorWorker | None = None
        self._gen = 0  # only the latest projection is shown
        self._stale = True  # the points (not only their colours) need a new projection
        self._hover_key = ""
        self._reproject_timer = QTimer(self, singleShot=True, interval=300)
        self._reproject_timer.timeout.connect(self.refresh)
        self._recolor_timer = QTimer(self, singleShot=True, interval=150)
        self._recolor_timer.timeout.connect(self.recolor)
        self.canvas.hovered.connect(self._on_hover)
        self.canvas.clicked.connect(self._on_click)
        self.canvas.selected.connect(self.assign_selection)
        thumbs.ready.connect(self._on_thumb)
        labeling.run_finished.connect(lambda _s: self.invalidate())
        labeling.scanned.connect(lambda _n: self.invalidate())
        classes.support_changed.connect(self.invalidate)
        labeling.relabeled.connect(self._recolor_timer.start)
        labeling.reviewed_changed.connect(self._recolor_timer.start)
        classes.dataChanged.connect(lambda *_: self._recolor_timer.start())
        reviewing.selection.selectionChanged.connect(lambda *_: self._highlight_selection())

    # -- the map --------------------------------------------------------------------------------
    def is_shown(self) -> bool:
        return self.panel.isVisible()

    def invalidate(self) -> None:
        """The set of points changed: project again (soon, if the map is shown)."""
        self._stale = True
        if self.is_shown():
            self._reproject_timer.start()

    def on_shown(self, visible: bool) -> None:
        """The dock was shown: project if the points changed meanwhile, else recolour."""
        if visible and self._stale:
            self.refresh()
        elif visible:
            self.recolor()

    def refresh(self) -> GeneratorWorker | None:
        """Read the features and project them in a worker; None if there is no model."""
        self._reproject_timer.stop()
        if not self.labeling.feature_id:
            self.panel.set_status("Choose a model and label the images to see the map")
            return None
        self._stale = False
        self._gen += 1
        gen = self._gen
        query = self.gallery.paths()
        seen = {str(p) for p in query}
        examples = [(row, p) for row, ps in enumerate(self.classes.support().values())
                    for p in ps if str(p) not in seen]
        paths = query + [p for _, p in examples]
        kinds = [-1] * len(query) + [row for row, _ in examples]
        self.panel.set_status(f"Reading the features of {len(paths)} images…")
        self._stop_projection()
        if self._slow is None:
            self._slow = self.slow_projection()
        w = GeneratorWorker(_map_job, paths, self.labeling.feature_id,
                            self.labeling.cache_path, self._slow)
        w.signals.yielded.connect(lambda p: self._show(gen, paths, kinds, p.payload, True))
        w.signals.finished.connect(lambda r: self._show(gen, paths, kinds, r, False))
        w.signals.errored.connect(lambda e: self.panel.set_status(f"No map: {e}"))
        self._map_job = w
        return self._start(w, self.pool)

    def _stop_projection(self) -> None:
        """The running projection is not wanted any more: a queued job never starts, a
        running one's child process is killed (the job then ends at once)."""
        if self._map_job is not None:
            self._map_job.cancel()
        if self._slow is not None:
            self._slow.cancel()

    def shutdown(self) -> None:
        """The window is closing: stop projecting (the child process ends), waiting for
        nothing."""
        self._reproject_timer.stop()
        self._recolor_timer.stop()
        self._gen += 1  # nothing that is still on its way gets shown
        self._stop_projection()
        if self._slow is not None:
            self._slow.stop()

    def _show(self, gen: int, paths: list[Path], kinds: list[int],
              result: tuple[np.ndarray, np.ndarray, str] | None, more: bool) -> None:
        if gen != self._gen or result is None:
            return  # a later projection replaced this one, or it was stopped
        rows, xy, method = result
        self.paths = [paths[i] for i in rows]
        self.example_class = [kinds[i] for i in rows]
        self.method = method
        self.canvas.set_points(self._points(np.asarray(xy, np.float64)))
        missing = len(paths) - len(rows)
        text = f"{method} · {len(rows)} images"
        if missing:
            text += f" · {missing} without features (label them first)"
        if more:
            text += " · computing UMAP…"
        self.panel.set_status(text)
        self._highlight_selection()
        self.map_ready.emit(method)

    def _points(self, xy: np.ndarray) -> MapPoints:
        """Colours and flags of every point from the gallery's predictions."""
        names = self.classes.names()
        index = {n: i for i, n in enumerate(names)}
        join = self.labeling.settings.corrections_join_support
        n = len(self.paths)
        label, conf = np.full(n, -1), np.full(n, np.nan)
        support, reviewed = np.zeros(n, bool), np.zeros(n, bool)
        marks = self.gallery.reviewed_paths()
        for i, (path, ex) in enumerate(zip(self.paths, self.example_class, strict=True)):
            if ex >= 0:  # a class example outside the query folder
                label[i], conf[i], support[i], reviewed[i] = ex, 1.0, True, True
                continue
            p = self.gallery.prediction_for(path)
            if p is None:
                continue
            label[i] = index.get(p.label, -1) if p.label is not None else -1
            conf[i] = p.confidence if p.status != Status.ERROR else np.nan
            support[i] = bool(p.corrected and join)
            reviewed[i] = path in marks
        colors = [self.classes.color_of(name) or NO_LABEL for name in names]
        return MapPoints(xy, support, label, conf, reviewed, colors)

    def recolor(self) -> None:
        """New predictions or review marks: same points, new colours."""
        if self.paths and self.is_shown():
            self.canvas.set_points(self._points(self.canvas.points.xy), keep_view=True)
            self._highlight_selection()

    def _highlight_selection(self) -> None:
        if not self.paths or not self.is_shown():
            return
        row = {str(p): i for i, p in enumerate(self.paths)}
        chosen = [str(ix.data(Role.PATH)) for ix in self.reviewing.selection.selectedIndexes()]
        self.canvas.set_highlight([row[p] for p in chosen if p in row])

    # -- hover, click, selection ------------------------------------------------------------------
    def _on_hover(self, i: int) -> None:
        self._hover_key = str(self.paths[i]) if 0 <= i < len(self.paths) else ""
        if self._hover_key:
            self._set_thumb(i, self.thumbs.get(self._hover_key))

    def _on_thumb(self, key: str) -> None:
        if key and key == self._hover_key:
            self._set_thumb(self.canvas.hover_index, self.thumbs.get(key))

    def _set_thumb(self, i: int, pix: QPixmap | None) -> None:
        if pix is not None and max(pix.width(), pix.height()) > THUMB_PX:
            pix = pix.scaled(THUMB_PX, THUMB_PX, Qt.AspectRatioMode.KeepAspectRatio,
                             Qt.TransformationMode.SmoothTransformation)
        self.canvas.set_thumbnail(i, pix)

    def _on_click(self, i: int) -> None:
        path = self.paths[i]
        if self.example_class[i] >= 0:
            name = self.classes.names()[self.example_class[i]]
            self.message.emit(f"{path.name}: an example of “{name}”", 4000)
            return
        self.reviewing.move_to(path)  # the gallery's selection, so Details shows it too
        cur = self.reviewing.selection.currentIndex()
        if not cur.isValid() or str(cur.data(Role.PATH)) != str(path):
            self.message.emit(f"{path.name} is hidden by the gallery's filter", 4000)

    def assign_selection(self, indices: list[int]) -> bool:
        """A rectangle or lasso: assign a class to its query images (undoable; they join the
        class examples and everything relabels). Class examples in it are left as they are."""
        paths = [self.paths[i] for i in indices if self.example_class[i] < 0]
        if not paths:
            if indices:
                self.message.emit("Only class examples are in the selection", 4000)
            return False
        if not self.classes.rowCount():
            self.message.emit("Add a class first", 4000)
            return False
        row = self.ask_class(len(paths))
        if row is None:
            return False
        return self.reviewing.correct_paths(paths, row)

    def _ask_class(self, n: int) -> int | None:
        menu = QMenu(self.panel)
        menu.addSection(f"Assign {n} image{'s' if n != 1 else ''} to")
        for row, name in enumerate(self.classes.names()):
            menu.addAction(name).setData(row)
        chosen = menu.exec(QCursor.pos())
        return None if chosen is None else int(chosen.data())

    # -- find similar ---------------------------------------------------------------------------
    def find_similar(self, path: Path) -> GeneratorWorker | None:
        """Sort the gallery by similarity to ``path`` (most similar first; images without a
        cached feature last), ranked in a worker."""
        return self._similar(path, 0, lambda paths, ranked, _top: self._sort_by(
            path, paths, ranked))

    def label_most_similar(self, path: Path, n: int, class_row: int
                           ) -> GeneratorWorker | None:
        """Correct ``path`` and its ``n - 1`` most similar images to class ``class_row``:
        one undoable action."""
        def apply(paths: list[Path], _ranked: list[int], top: list[int]) -> None:
            if self.reviewing.correct_paths([paths[i] for i in top], class_row):
                self.message.emit(f"Labeled the {len(top)} images most similar to "
                                  f"{path.name} as “{self.classes.names()[class_row]}”", 5000)

        return self._similar(path, n, apply)

    def _similar(self, path: Path, n: int,
                 then: Callable[[list[Path], list[int], list[int]], None]
                 ) -> GeneratorWorker | None:
        if not self.labeling.feature_id:
            self.message.emit("Choose a model and label the images first", 4000)
            return None

        def done(result: tuple[list[Path], list[int], list[int]] | None) -> None:
            if result is None:
                self.message.emit(f"{path.name} has no features yet: label it first", 5000)
            else:
                then(*result)

        w = GeneratorWorker(_similar_job, self.gallery.paths(), path, n,
                            self.labeling.feature_id, self.labeling.cache_path)
        w.signals.finished.connect(done)
        w.signals.errored.connect(bind_to(
            self, lambda e: self.message.emit(f"Cannot compare: {e}", 6000)))
        return self._start(w)

    def _sort_by(self, anchor: Path, paths: list[Path], ranked: list[int]) -> None:
        if set(map(str, self.gallery.paths())) != set(map(str, paths)):
            self.message.emit("The images changed meanwhile: try again", 4000)
            return
        if self.proxy.by_confidence:
            self.proxy.set_sort(False)  # (re-sorts the rows: map the ranking after it)
        rows = [self.gallery.row_of(paths[i]) for i in ranked]
        self.gallery.apply_order([r for r in rows if r is not None])
        self.reviewing.move_to(anchor)
        self.message.emit(f"Sorted by similarity to {anchor.name}", 5000)
        self.similar_sorted.emit(anchor)

    def _start(self, w: GeneratorWorker, pool: QThreadPool | None = None) -> GeneratorWorker:
        self.workers.append(w)
        del self.workers[:-20]
        return w.start(pool or QThreadPool.globalInstance())


# -- wiring into the main window ---------------------------------------------------------------
def ask_label_similar(parent: QWidget, anchor: Path, names: list[str], most: int
                      ) -> tuple[int, int] | None:
    """The "Label N most similar as…" dialog: ``(n, class row)``, None if cancelled."""
    dlg = QDialog(parent)
    dlg.setWindowTitle("Label the most similar images")
    form = QFormLayout(dlg)
    n = QSpinBox()
    n.setRange(1, max(1, most))
    n.setValue(min(10, max(1, most)))
    n.setToolTip(f"{anchor.name} and the images most like it (it counts as the first)")
    cls = QComboBox()
    cls.addItems(names)
    form.addRow("Images:", n)
    form.addRow("Label as:", cls)
    buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok
                               | QDialogButtonBox.StandardButton.Cancel)
    buttons.accepted.connect(dlg.accept)
    buttons.rejected.connect(dlg.reject)
    form.addRow(buttons)
    if dlg.exec() != QDialog.DialogCode.Accepted:
        return None
    return n.value(), cls.currentIndex()


def _menu(win: QMainWindow, title: str, before: str = "&Help") -> QMenu:
    """The window's menu titled ``title`` (created before ``before`` if there is none)."""
    bar = win.menuBar()
    anchor = None
    for a in bar.actions():
        if a.menu() is not None and a.text() == title:
            return a.menu()
        if a.text() == before:
            anchor = a
    menu = QMenu(title, win)
    if anchor is not None:
        bar.insertMenu(anchor, menu)
    else:
        bar.addMenu(menu)
    return menu


def install(win: Any) -> EmbeddingMapController:
    """Give a :class:`~fewshot_studio.gui.main_window.MainWindow` the map dock (View >
    Embedding map, Ctrl+M) and the find-similar actions (gallery context menu and the Review
    menu: Ctrl+Shift+F, Ctrl+Shift+L), acting on the gallery's current image."""
    panel = EmbeddingMapPanel()
    dock = QDockWidget("Embedding map", win)
    dock.setObjectName("embeddingMapDock")
    dock.setWidget(panel)
    win.addDockWidget(Qt.DockWidgetArea.BottomDockWidgetArea, dock)
    dock.hide()
    ctl = EmbeddingMapController(panel, win.gallery_model, win.proxy, win.classes,
                                 win.labeling, win.reviewing, win.thumbs, win)
    ctl.dock = dock
    win.closing.connect(ctl.shutdown)
    dock.visibilityChanged.connect(ctl.on_shown)
    sized: list[bool] = []

    def first_size(visible: bool) -> None:  # a third of the window, the first time it shows
        if visible and not sized and not dock.isFloating():
            sized.append(True)
            win.resizeDocks([dock], [max(260, win.height() // 3)], Qt.Orientation.Vertical)

    dock.visibilityChanged.connect(first_size)
    ctl.message.connect(win.statusBar().showMessage)
    toggle = dock.toggleViewAction()
    toggle.setText("&Embedding map")
    toggle.setShortcut(QKeySequence("Ctrl+M"))
    toggle.setStatusTip("A 2-D map of the images' features: lasso a cluster to label it")
    _menu(win, "&View").addAction(toggle)
    win.addAction(toggle)

    def current() -> Path | None:
        rows = win.reviewing.target_rows()
        return Path(win.proxy.index(rows[0], 0).data(Role.PATH)) if rows else None

    def find() -> None:
        if (p := current()) is not None:
            ctl.find_similar(p)

    def label_n() -> None:
        p = current()
        if p is None or not win.classes.rowCount():
            ctl.message.emit("Select an image (and add classes) first", 4000)
            return
        answer = ctl.ask_label_similar(p)
        if answer is not None:
            ctl.label_most_similar(p, *answer)

    ctl.ask_label_similar = lambda p: ask_label_similar(
        win, p, win.classes.names(), win.gallery_model.rowCount())
    ctl.find_action = QAction("Find &similar", win, shortcut=QKeySequence("Ctrl+Shift+F"),
                              statusTip="Sort the gallery by similarity to this image")
    ctl.label_action = QAction("&Label N most similar as…", win,
                               shortcut=QKeySequence("Ctrl+Shift+L"),
                               statusTip="Label this image and the ones most like it")
    ctl.find_action.triggered.connect(find)
    ctl.label_action.triggered.connect(label_n)
    review = _menu(win, "&Review")
    review.addSeparator()
    for a in (ctl.find_action, ctl.label_action):
        win.addAction(a)
        review.addAction(a)
        win.gallery.addAction(a)
    win.gallery.setContextMenuPolicy(Qt.ContextMenuPolicy.ActionsContextMenu)
    ctl.similar_sorted.connect(lambda _p: win.review.sort.setCurrentIndex(
        win.review.sort.findData(False)))  # the combo no longer says "least confident"
    return ctl
