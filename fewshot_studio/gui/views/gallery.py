"""The query gallery: a virtualised ``QListView`` (icon mode, uniform item sizes, batched
layout) with a tile delegate. Tiles show the thumbnail, the predicted label as a coloured
badge and the confidence, and distinct marks for unknown (grey dashed badge + best guess),
corrected (green check), reviewed (slate check: the user accepted the prediction) and error
(red badge, reason in the tooltip). Review keys (1-9, Enter/Space, N) become signals, and a
folder dropped on the gallery becomes the query folder (image files: the folder holding the
first one)."""

from __future__ import annotations

import time
from collections import OrderedDict
from pathlib import Path

from PySide6.QtCore import (
    QMimeData,
    QModelIndex,
    QPoint,
    QPointF,
    QRect,
    QRectF,
    QSize,
    Qt,
    QTimer,
    QUrl,
    Signal,
)
from PySide6.QtGui import (
    QBrush,
    QColor,
    QDrag,
    QFont,
    QFontMetrics,
    QPainter,
    QPainterPath,
    QPen,
    QPixmap,
)
from PySide6.QtWidgets import (
    QAbstractItemView,
    QListView,
    QStyle,
    QStyledItemDelegate,
    QStyleOptionViewItem,
    QWidget,
)

from fewshot_studio.data.images import is_image_path
from fewshot_studio.engine.api import Prediction
from fewshot_studio.gui.models.gallery import Role
from fewshot_studio.gui.views.class_card import QUERY_MIME, local_paths
from fewshot_studio.gui.views.style import theme

TILE = QSize(172, 204)
THUMB_H = 132
THUMB_BOX = (TILE.width() - 20, THUMB_H)  # the thumbnail area of a tile, in px


def _pill(p: QPainter, rect: QRectF, fill: QColor | None, text: str, fg: QColor,
          outline: QColor | None = None, dashed: bool = False) -> None:
    path = QPainterPath()
    path.addRoundedRect(rect, rect.height() / 2, rect.height() / 2)
    if fill is not None:
        p.fillPath(path, fill)
    if outline is not None:
        pen = QPen(outline, 1.2)
        if dashed:
            pen.setStyle(Qt.PenStyle.DashLine)
        p.setPen(pen)
        p.drawPath(path)
    p.setPen(fg)
    p.drawText(rect, Qt.AlignmentFlag.AlignCenter, text)


class TileDelegate(QStyledItemDelegate):
    """Paints tiles from an LRU cache of rendered tile pixmaps: a tile is drawn in Python only
    when its content changes (prediction, thumbnail, colour, selection, hover, theme); every
    other repaint is one ``drawPixmap``. Colours come from the current theme
    (:func:`.style.theme`); class colours are the user's, with white badge text."""

    def __init__(self, parent: QWidget | None = None, capacity: int = 400) -> None:
        super().__init__(parent)
        self.badge_font = QFont()
        self.badge_font.setPointSizeF(8.5)
        self.badge_font.setBold(True)
        self.small_font = QFont()
        self.small_font.setPointSizeF(8)
        self.fm = QFontMetrics(self.small_font)
        self.bfm = QFontMetrics(self.badge_font)
        self.capacity = capacity
        self._cache: OrderedDict[tuple, QPixmap] = OrderedDict()
        self.rendered = 0  # tiles drawn in Python (cache misses)
        # Progressive painting: once a paint has spent ``budget_s`` rendering new tiles, the
        # rest get a cheap placeholder and the view repaints right after (fast flings over
        # 20,000 images never block the event loop for a whole screen of new tiles).
        self.budget_s = 0.012
        self.frame_start = 0.0
        self.deferred = False

    def sizeHint(self, option: QStyleOptionViewItem, index: QModelIndex) -> QSize:
        return TILE

    def paint(self, p: QPainter, option: QStyleOptionViewItem, index: QModelIndex) -> None:
        state = index.data(Role.TILE)
        if state is None:
            return
        path, pred, pm, error, color, reviewed, dup = state
        selected = bool(option.state & QStyle.StateFlag.State_Selected)
        hover = bool(option.state & QStyle.StateFlag.State_MouseOver)
        dpr = p.device().devicePixelRatioF() if p.device() else 1.0
        t = theme()
        key = (path, pred, pm.cacheKey() if pm is not None else 0, error,
               color.rgba() if color is not None else 0, reviewed, selected, hover, dpr,
               t.name, dup)
        tile = self._cache.get(key)
        cell = QRectF(option.rect)
        r = QRectF(0, 0, TILE.width(), TILE.height())
        r.moveCenter(cell.center())
        if tile is None and time.perf_counter() - self.frame_start > self.budget_s:
            self.deferred = True  # over budget: placeholder now, the real tile next frame
            card = r.adjusted(4, 4, -4, -4)
            p.fillRect(card, t.color("base"))
            if pm is not None:
                p.drawPixmap(card.topLeft() + QPointF(6, 6), pm)
            return
        if tile is None:
            tile = QPixmap(TILE * dpr)
            tile.setDevicePixelRatio(dpr)
            tile.fill(Qt.GlobalColor.transparent)
            tp = QPainter(tile)
            self._render(tp, path, pred, pm, error, color, selected, hover, reviewed)
            if dup:
                self._draw_duplicate(tp, dup)
            tp.end()
            self.rendered += 1
            self._cache[key] = tile
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        p.drawPixmap(r.topLeft(), tile)

    def _draw_duplicate(self, p: QPainter, tag: str) -> None:
        """A tag at the thumbnail's bottom left: "group 3" for a member of a near-duplicate
        group, "duplicate" (and the thumbnail dimmed) for one marked as a duplicate."""
        r = QRectF(4, 4, TILE.width() - 8, TILE.height() - 8)
        thumb = QRectF(r.left() + 6, r.top() + 6, r.width() - 12, THUMB_H)
        marked = tag == "duplicate"
        if marked:
            p.fillRect(thumb, QColor(255, 255, 255, 140))
        p.setFont(self.badge_font)
        w = self.bfm.horizontalAdvance(tag) + 14
        _pill(p, QRectF(thumb.left() + 4, thumb.bottom() - 22, w, 18),
              QColor("#7c3aed" if marked else "#475569"), tag, QColor("white"))

    def _render(self, p: QPainter, path: str, pred: Prediction | None, pm: QPixmap | None,
                error: str, color: QColor | None, selected: bool, hover: bool,
                reviewed: bool = False) -> None:
        t = theme()
        accent, error_c, ok, white = (t.color("accent"), t.color("error"), t.color("ok"),
                                      QColor("white"))
        p.setRenderHint(QPainter.RenderHint.Antialiasing)
        p.setRenderHint(QPainter.RenderHint.SmoothPixmapTransform)
        r = QRectF(4, 4, TILE.width() - 8, TILE.height() - 8)
        card = QPainterPath()
        card.addRoundedRect(r, 8, 8)
        p.fillPath(card, t.color("accent_soft" if selected else "base"))
        p.setPen(QPen(accent, 2.2) if selected else
                 QPen(t.color("tile_border_hover" if hover else "tile_border"), 1))
        p.drawPath(card)

        thumb = QRectF(r.left() + 6, r.top() + 6, r.width() - 12, THUMB_H)
        tp = QPainterPath()
        tp.addRoundedRect(thumb, 5, 5)
        p.fillPath(tp, t.color("thumb_bg"))
        status = str(pred.status) if pred is not None else ""
        if pm is not None and not pm.isNull() and pm.size() == thumb.size().toSize():
            p.save()  # decoded to exactly this box (ThumbnailCache box=THUMB_BOX): a blit
            p.setClipPath(tp)
            p.drawPixmap(thumb.topLeft(), pm)
            p.restore()
        elif pm is not None and not pm.isNull():  # "cover": fill the box, crop
            src = QRectF(pm.rect())
            aspect = thumb.width() / thumb.height()
            if src.width() / src.height() > aspect:
                w = src.height() * aspect
                src = QRectF(src.left() + (src.width() - w) / 2, src.top(), w, src.height())
            else:
                h = src.width() / aspect
                src = QRectF(src.left(), src.top() + (src.height() - h) / 2, src.width(), h)
            p.save()
            p.setClipPath(tp)
            p.drawPixmap(thumb, pm, src)
            p.restore()
        elif error:
            p.setPen(error_c)
            p.setFont(self.small_font)
            p.drawText(thumb.adjusted(8, 8, -8, -8), Qt.AlignmentFlag.AlignCenter
                       | Qt.TextFlag.TextWordWrap, "cannot open image")

        corrected = bool(pred is not None and pred.corrected)
        if corrected or reviewed:  # check in the thumbnail's top-right corner: green when
            c = QRectF(thumb.right() - 24, thumb.top() + 4, 20, 20)  # corrected, else slate
            p.setBrush(QColor("#16a34a") if corrected else QColor("#475569"))  # white check
            p.setPen(QPen(white, 1.5))  # on the thumbnail: the same colours in both themes
            p.drawEllipse(c)
            p.setPen(QPen(white, 2.2))
            p.drawPolyline([QPoint(int(c.left() + 5), int(c.top() + 10)),
                            QPoint(int(c.left() + 9), int(c.top() + 14)),
                            QPoint(int(c.left() + 15), int(c.top() + 6))])
            p.setBrush(Qt.BrushStyle.NoBrush)  # the badges below fill their own shapes
        if status == "error" or error:
            c = QRectF(thumb.left() + 4, thumb.top() + 4, 20, 20)
            p.setBrush(QColor("#dc2626"))
            p.setPen(Qt.PenStyle.NoPen)
            p.drawEllipse(c)
            p.setPen(white)
            p.setFont(self.badge_font)
            p.drawText(c, Qt.AlignmentFlag.AlignCenter, "!")

        conf = pred.confidence if pred is not None else None
        label = pred.label if pred is not None else None
        if status == "ok" and conf is not None:  # confidence bar under the thumbnail
            bar = QRectF(thumb.left(), thumb.bottom() + 4, thumb.width(), 3)
            p.fillRect(bar, t.color("track"))
            p.fillRect(QRectF(bar.left(), bar.top(), bar.width() * float(conf), 3),
                       color or accent)

        fm, bfm = self.fm, self.bfm
        p.setFont(self.small_font)
        p.setPen(t.color("muted"))
        p.drawText(QRectF(thumb.left(), thumb.bottom() + 9, thumb.width(), 16),
                   Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignVCenter,
                   fm.elidedText(Path(path).name, Qt.TextElideMode.ElideMiddle,
                                 int(thumb.width())))

        row = QRectF(thumb.left(), r.bottom() - 26, thumb.width(), 21)
        p.setFont(self.badge_font)
        right, w = "", 0.0
        if status == "ok" and label:
            text = bfm.elidedText(label, Qt.TextElideMode.ElideRight, int(row.width() - 60))
            w = bfm.horizontalAdvance(text) + 18
            _pill(p, QRectF(row.left(), row.top(), w, row.height()), color or accent, text,
                  white)
            right = "✓ fixed" if corrected else f"{float(conf or 0):.0%}"
        elif status == "unknown":
            guess = pred.top[0][0] if pred is not None and pred.top else None
            w = bfm.horizontalAdvance("unknown") + 18
            _pill(p, QRectF(row.left(), row.top(), w, row.height()), t.color("unknown_fill"),
                  "unknown", t.color("unknown_fg"), t.color("unknown_outline"), dashed=True)
            right = f"{guess}? {float(conf or 0):.0%}" if guess else ""
        elif status == "error":
            w = bfm.horizontalAdvance("error") + 18
            _pill(p, QRectF(row.left(), row.top(), w, row.height()), QColor("#dc2626"),
                  "error", white)
        else:
            p.setPen(t.color("faint"))
            p.drawText(row, Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignVCenter,
                       "not labeled")
        if right:
            p.setFont(self.small_font)
            p.setPen(ok if corrected else t.color("text"))
            p.drawText(row, Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter,
                       fm.elidedText(right, Qt.TextElideMode.ElideMiddle,
                                     int(row.width() - w - 6)))


class GalleryView(QListView):
    """The review keys become signals: ``correct_requested(class_row)`` for 1-9,
    ``accept_requested`` for Enter / Space, ``next_unreviewed_requested(step)`` for N (+1) and
    Shift+N (-1). Also ``folder_dropped(path)``."""

    correct_requested = Signal(int)
    accept_requested = Signal()
    next_unreviewed_requested = Signal(int)
    folder_dropped = Signal(Path)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("gallery")
        self.setViewMode(QListView.ViewMode.IconMode)
        self.setUniformItemSizes(True)
        self.setLayoutMode(QListView.LayoutMode.Batched)
        self.setBatchSize(500)
        self.setResizeMode(QListView.ResizeMode.Adjust)
        self.setMovement(QListView.Movement.Static)  # (this turns the viewport's drops off)
        self.setSpacing(2)
        self.setSelectionMode(QAbstractItemView.SelectionMode.ExtendedSelection)
        self.setSelectionRectVisible(True)
        self.setDragEnabled(True)
        self.setAcceptDrops(True)
        self.setDragDropMode(QAbstractItemView.DragDropMode.DragDrop)
        self.setDefaultDropAction(Qt.DropAction.CopyAction)
        self.viewport().setAcceptDrops(True)  # after setMovement: folders can be dropped
        self.setMouseTracking(True)
        self.setVerticalScrollMode(QAbstractItemView.ScrollMode.ScrollPerPixel)
        self.verticalScrollBar().setSingleStep(24)
        self.setItemDelegate(TileDelegate(self))
        self.placeholder = "Choose a folder of images to label (Ctrl+Shift+O), or drop it here"

    def resizeEvent(self, e) -> None:
        super().resizeEvent(e)  # (the viewport's resizes come here too)
        self._fit_grid()

    def layout_width(self) -> int:
        """The width ``QListView`` wraps tiles in: the viewport's width without a scroll bar,
        less the scroll bar's extent, which it always reserves (so it is the same whether the
        bar is shown or not: a filter that hides the bar does not change the columns)."""
        w = self.maximumViewportSize().width()
        if self.verticalScrollBarPolicy() == Qt.ScrollBarPolicy.ScrollBarAsNeeded:
            w -= self.style().pixelMetric(QStyle.PixelMetric.PM_ScrollBarExtent, None,
                                          self.verticalScrollBar())
        return w

    def columns(self) -> int:
        return max(1, (self.layout_width() - 1) // TILE.width())

    def _fit_grid(self) -> None:
        """Spread the columns over the full width (no ragged gap on the right): as many tiles
        as fit, each cell widened to share the rest (a tile wraps once its cell would end
        past the layout width's last pixel)."""
        cols = self.columns()
        grid = QSize(max(TILE.width(), (self.layout_width() - 1) // cols), TILE.height())
        if grid != self.gridSize():
            self.setGridSize(grid)

    def selected_paths(self) -> list[Path]:
        rows = sorted(self.selectionModel().selectedIndexes(), key=lambda i: i.row())
        return [Path(i.data(Role.PATH)) for i in rows]

    def keyPressEvent(self, e) -> None:
        k = e.key()
        mods = e.modifiers() & ~Qt.KeyboardModifier.KeypadModifier
        plain = not (mods & (Qt.KeyboardModifier.ControlModifier
                             | Qt.KeyboardModifier.AltModifier
                             | Qt.KeyboardModifier.MetaModifier))
        if plain and Qt.Key.Key_1 <= k <= Qt.Key.Key_9:
            self.correct_requested.emit(k - Qt.Key.Key_1)
        elif plain and k in (Qt.Key.Key_Return, Qt.Key.Key_Enter, Qt.Key.Key_Space) \
                and self.state() != QAbstractItemView.State.EditingState:
            self.accept_requested.emit()  # (Ctrl+Space keeps toggling the selection)
        elif plain and k == Qt.Key.Key_N:
            shift = bool(mods & Qt.KeyboardModifier.ShiftModifier)
            self.next_unreviewed_requested.emit(-1 if shift else 1)
        else:
            super().keyPressEvent(e)
            return
        e.accept()

    def startDrag(self, actions) -> None:
        paths = self.selected_paths()
        if not paths:
            return
        mime = QMimeData()
        mime.setData(QUERY_MIME, "\n".join(str(p) for p in paths).encode("utf-8"))
        mime.setUrls([QUrl.fromLocalFile(str(p)) for p in paths[:200]])
        drag = QDrag(self)
        drag.setMimeData(mime)
        pm = self.model().index(self.currentIndex().row(), 0).data(
            Qt.ItemDataRole.DecorationRole)
        if isinstance(pm, QPixmap):
            drag.setPixmap(pm.scaled(72, 72, Qt.AspectRatioMode.KeepAspectRatio))
        drag.exec(Qt.DropAction.CopyAction)

    @staticmethod
    def dropped_folder(mime: QMimeData) -> Path | None:
        """The query folder a drop means: the first dropped folder, else the folder holding
        the first dropped image file; None for anything else (and for our own tiles)."""
        if mime.hasFormat(QUERY_MIME):
            return None
        paths = local_paths(mime)
        for p in paths:
            if p.is_dir():
                return p
        for p in paths:
            if p.is_file() and is_image_path(p.name):
                return p.parent
        return None

    def dragEnterEvent(self, e) -> None:
        if self.dropped_folder(e.mimeData()) is not None:
            e.setDropAction(Qt.DropAction.CopyAction)
            e.accept()
        else:
            e.ignore()

    def dragMoveEvent(self, e) -> None:
        self.dragEnterEvent(e)

    def dropEvent(self, e) -> None:
        folder = self.dropped_folder(e.mimeData())
        if folder is None:
            e.ignore()
            return
        e.setDropAction(Qt.DropAction.CopyAction)
        e.accept()
        self.folder_dropped.emit(folder)

    def paintEvent(self, e) -> None:
        d = self.itemDelegate()
        if isinstance(d, TileDelegate):
            d.frame_start, d.deferred = time.perf_counter(), False
        super().paintEvent(e)
        if isinstance(d, TileDelegate) and d.deferred:
            QTimer.singleShot(0, self.viewport().update)  # finish the deferred tiles
        if self.model() is None or self.model().rowCount() == 0:
            p = QPainter(self.viewport())
            p.setPen(theme().color("faint"))
            f = p.font()
            f.setPointSizeF(f.pointSizeF() * 1.15)
            p.setFont(f)
            p.drawText(QRect(self.viewport().rect()), Qt.AlignmentFlag.AlignCenter,
                       self.placeholder)
            p.setBrush(QBrush())
