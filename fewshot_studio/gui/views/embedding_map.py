"""The embedding map: a 2-D scatter of query and support images (a custom ``QWidget``).

Drawing is batched and bounded: every point is splatted into one ARGB buffer with numpy
(a small disc per query image, a larger outlined one per support example, a ring per
highlighted point) and the buffer is blitted in a single ``drawImage``; the buffer is kept
until the view, the colours or the size change. Hit-testing (hover, click) uses a uniform
grid over the points (``_Grid``), rectangle and lasso selection one vectorised test over all
points at release. So 20,000 points pan and zoom smoothly (``benchmarks/ui_stall.py``).

Mouse: wheel zooms about the cursor; a drag with the left button pans, draws a rectangle or
a lasso (the ``tool``; Shift+drag is always a rectangle, Ctrl+drag a lasso); the right or
middle button pans. Hover reports the point under the cursor (``hovered``; a thumbnail set
with :meth:`MapCanvas.set_thumbnail` is drawn beside it), a click reports it (``clicked``),
a finished rectangle or lasso reports the points inside (``selected``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PySide6.QtCore import QPoint, QPointF, QRectF, Qt, Signal
from PySide6.QtGui import (
    QColor,
    QImage,
    QMouseEvent,
    QPainter,
    QPaintEvent,
    QPen,
    QPixmap,
    QPolygonF,
    QResizeEvent,
    QWheelEvent,
)
from PySide6.QtWidgets import QSizePolicy, QWidget

COLOR_MODES = ("class", "confidence", "reviewed")
TOOLS = ("pan", "rect", "lasso")
HIT_RADIUS_PX = 6.0
CLICK_SLOP_PX = 4
NO_LABEL = QColor("#9a9a9a")
REVIEWED, UNREVIEWED = QColor("#2e9e5b"), QColor("#c9c9c9")
CONFIDENCE_BINS = 10
OUTLINE, HIGHLIGHT, BACKGROUND = 0xFF202020, 0xFFFFFFFF, QColor("#2b2b2b")


def _disc(radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Pixel offsets ``(dy, dx)`` of a filled disc."""
    r = int(np.ceil(radius))
    dy, dx = np.mgrid[-r:r + 1, -r:r + 1]
    inside = dy * dy + dx * dx <= radius * radius
    return dy[inside], dx[inside]


def _ring(outer: float, inner: float) -> tuple[np.ndarray, np.ndarray]:
    dy, dx = _disc(outer)
    keep = dy * dy + dx * dx > inner * inner
    return dy[keep], dx[keep]


QUERY_DOT, SUPPORT_EDGE, SUPPORT_DOT = _disc(2.3), _disc(5.2), _disc(4.0)
HIGHLIGHT_RING = _ring(7.5, 5.6)
_PAD = 8  # the splat buffer's margin: more than the largest kernel's radius


def _argb(c: QColor) -> int:
    return 0xFF000000 | (c.red() << 16) | (c.green() << 8) | c.blue()


def confidence_color(t: float) -> QColor:
    """Red (0) -> amber (0.5) -> green (1)."""
    t = float(min(1.0, max(0.0, t)))
    if t < 0.5:
        return QColor.fromRgbF(0.85, 0.2 + 1.1 * t, 0.15)
    return QColor.fromRgbF(0.85 - 1.3 * (t - 0.5), 0.75, 0.15 + 0.3 * (t - 0.5))


def points_in_polygon(pts: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """``(n, 2)`` points, ``(m, 2)`` polygon vertices -> ``(n,)`` bool, inside (even-odd
    rule, vectorised over the points: one pass per edge)."""
    inside = np.zeros(len(pts), bool)
    if len(poly) < 3:
        return inside
    x, y = pts[:, 0], pts[:, 1]
    x0, y0 = poly[:, 0], poly[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    for a, b, c, d in zip(x0, y0, x1, y1, strict=True):
        crosses = (b > y) != (d > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            xc = a + (y - b) * (c - a) / (d - b)
        inside ^= crosses & (x < xc)
    return inside


class _Grid:
    """Uniform grid over ``(n, 2)`` points in world coordinates (CSR: points sorted by cell)
    for nearest-point queries that touch a few cells, not all points."""

    def __init__(self, xy: np.ndarray) -> None:
        self.xy = xy
        n = len(xy)
        self.lo = xy.min(axis=0) if n else np.zeros(2)
        span = (xy.max(axis=0) - self.lo) if n else np.ones(2)
        side = max(1, int(np.sqrt(max(1, n) / 4)))  # ~4 points a cell
        self.cell = np.maximum(span / side, 1e-9)
        self.shape = (side + 1, side + 1)
        ij = self._ij(xy)
        ids = ij[:, 0] * self.shape[1] + ij[:, 1]
        self.order = np.argsort(ids, kind="stable")
        self.start = np.searchsorted(ids[self.order], np.arange(self.shape[0] * self.shape[1] + 1))

    def _ij(self, p: np.ndarray) -> np.ndarray:
        ij = np.floor((p - self.lo) / self.cell).astype(np.int64)
        return np.clip(ij, 0, np.array(self.shape) - 1)

    def nearest(self, p: np.ndarray, radius: float) -> int:
        """Index of the point nearest ``p`` within ``radius`` (world units), -1 if none."""
        if not len(self.xy):
            return -1
        lo, hi = self._ij(p - radius), self._ij(p + radius)
        if (hi - lo + 1).prod() > 4096:  # zoomed far out: a full scan is cheaper
            cand = np.arange(len(self.xy))
        else:
            rows = [self.order[self.start[i * self.shape[1] + lo[1]]:
                               self.start[i * self.shape[1] + hi[1] + 1]]
                    for i in range(lo[0], hi[0] + 1)]
            cand = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        if not len(cand):
            return -1
        d2 = ((self.xy[cand] - p) ** 2).sum(axis=1)
        k = int(d2.argmin())
        return int(cand[k]) if d2[k] <= radius * radius else -1


@dataclass
class MapPoints:
    """What the map shows, one entry per point: ``xy`` ``(n, 2)`` coordinates, ``support``
    ``(n,)`` bool (a class example: drawn larger, outlined), ``label`` ``(n,)`` int (class
    index into ``class_colors``, -1: none), ``confidence`` ``(n,)`` float in [0, 1] (NaN:
    none), ``reviewed`` ``(n,)`` bool."""

    xy: np.ndarray
    support: np.ndarray
    label: np.ndarray
    confidence: np.ndarray
    reviewed: np.ndarray
    class_colors: list[QColor]

    @classmethod
    def of(cls, xy: np.ndarray, support: np.ndarray | None = None) -> MapPoints:
        """Points without predictions (every point unlabeled)."""
        n = len(xy)
        return cls(np.asarray(xy, np.float64),
                   np.zeros(n, bool) if support is None else np.asarray(support, bool),
                   np.full(n, -1), np.full(n, np.nan), np.zeros(n, bool), [])


class MapCanvas(QWidget):
    """The scatter itself; see the module doc for the mouse."""

    hovered = Signal(int)  # point index under the cursor, -1 when none
    clicked = Signal(int)  # a point clicked
    selected = Signal(list)  # indices inside a finished rectangle or lasso (may be empty)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setMouseTracking(True)
        self.setMinimumSize(160, 120)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self.points = MapPoints.of(np.zeros((0, 2)))
        self.color_mode, self.tool = "class", "pan"
        self._grid = _Grid(self.points.xy)
        self._colors = np.zeros(0, np.uint32)
        self._highlight = np.zeros(0, np.int64)
        self.center, self.scale, self._fit_scale = np.zeros(2), 1.0, 1.0
        self._image: QImage | None = None  # the splatted points, kept until a change
        self._buf: np.ndarray | None = None  # owns the image's pixels
        self.hover_index = -1
        self._thumb: QPixmap | None = None
        self._press: QPoint | None = None
        self._last: QPoint | None = None
        self._drag = ""  # "", "pan", "rect", "lasso"
        self._moved = False  # the pressed mouse went beyond the click slop
        self._path: list[QPointF] = []
        self.paints = 0  # repaints of the point buffer (tests, the benchmark)

    # -- data ---------------------------------------------------------------------------------
    def set_points(self, points: MapPoints, keep_view: bool = False) -> None:
        """Show ``points``; ``keep_view``: the same layout with new values (no re-fit; the
        hovered point and its thumbnail stay)."""
        self.points = points
        self._grid = _Grid(points.xy)
        self._highlight = self._highlight[self._highlight < len(points.xy)]
        if not keep_view:
            self.hover_index, self._thumb = -1, None
            self.fit()
        self._recolor()

    def set_color_mode(self, mode: str) -> None:
        if mode not in COLOR_MODES:
            raise ValueError(f"unknown colour mode {mode!r}")
        self.color_mode = mode
        self._recolor()

    def set_tool(self, tool: str) -> None:
        if tool not in TOOLS:
            raise ValueError(f"unknown tool {tool!r}")
        self.tool = tool
        self.setCursor(Qt.CursorShape.OpenHandCursor if tool == "pan"
                       else Qt.CursorShape.CrossCursor)

    def set_highlight(self, indices: list[int] | np.ndarray) -> None:
        """Ring these points (the gallery's selection)."""
        self._highlight = np.asarray(indices, np.int64).reshape(-1)
        self._highlight = self._highlight[(self._highlight >= 0)
                                          & (self._highlight < len(self.points.xy))]
        self._invalidate()

    def set_thumbnail(self, index: int, pixmap: QPixmap | None) -> None:
        """The hovered point's thumbnail (ignored unless ``index`` is still hovered)."""
        if index == self.hover_index:
            self._thumb = pixmap
            self.update()

    def point_colors(self) -> np.ndarray:
        """``(n,)`` uint32 ARGB of each point in the current colour mode."""
        return self._colors

    def _recolor(self) -> None:
        p, n = self.points, len(self.points.xy)
        if self.color_mode == "class":
            palette = np.array([_argb(c) for c in p.class_colors] + [_argb(NO_LABEL)], np.uint32)
            lab = np.where((p.label >= 0) & (p.label < len(p.class_colors)), p.label, -1)
            self._colors = palette[lab] if n else np.zeros(0, np.uint32)
        elif self.color_mode == "confidence":
            palette = np.array([_argb(confidence_color(i / (CONFIDENCE_BINS - 1)))
                                for i in range(CONFIDENCE_BINS)] + [_argb(NO_LABEL)], np.uint32)
            conf = np.nan_to_num(p.confidence, nan=-1.0)
            bins = np.where(conf < 0, -1, np.clip(np.round(conf * (CONFIDENCE_BINS - 1)), 0,
                                                  CONFIDENCE_BINS - 1)).astype(np.int64)
            self._colors = palette[bins]
        else:
            self._colors = np.where(p.reviewed, _argb(REVIEWED), _argb(UNREVIEWED)
                                    ).astype(np.uint32)
        self._invalidate()

    # -- view ---------------------------------------------------------------------------------
    def fit(self) -> None:
        """Show every point, with a margin."""
        xy = self.points.xy
        if not len(xy):
            self.center, self.scale = np.zeros(2), 1.0
        else:
            lo, hi = xy.min(axis=0), xy.max(axis=0)
            self.center = (lo + hi) / 2
            span = np.maximum(hi - lo, 1e-9)
            self.scale = 0.9 * min(max(1, self.width()) / span[0],
                                   max(1, self.height()) / span[1])
        self._fit_scale = self.scale
        self._invalidate()

    def to_screen(self, xy: np.ndarray) -> np.ndarray:
        """World ``(n, 2)`` -> widget pixels ``(n, 2)`` (y up in the world, down on screen)."""
        half = np.array([self.width() / 2, self.height() / 2])
        s = (np.asarray(xy, np.float64) - self.center) * self.scale
        return np.stack([half[0] + s[:, 0], half[1] - s[:, 1]], axis=1)

    def to_world(self, pos: QPointF | QPoint) -> np.ndarray:
        return np.array([self.center[0] + (pos.x() - self.width() / 2) / self.scale,
                         self.center[1] - (pos.y() - self.height() / 2) / self.scale])

    def pan_by(self, dx: float, dy: float) -> None:
        """Move the view by ``(dx, dy)`` pixels (the points follow the mouse)."""
        self.center = self.center + np.array([-dx, dy]) / self.scale
        self._invalidate()

    def zoom_at(self, pos: QPointF | QPoint, factor: float) -> None:
        """Zoom by ``factor`` keeping the world point under ``pos`` in place (between half
        the fitted scale and 1000 times it)."""
        before = self.to_world(pos)
        self.scale = float(np.clip(self.scale * factor, self._fit_scale * 0.5,
                                   self._fit_scale * 1000))
        self.center = self.center + before - self.to_world(pos)
        self._invalidate()

    def index_at(self, pos: QPointF | QPoint) -> int:
        """The point within :data:`HIT_RADIUS_PX` of ``pos`` (nearest), -1 if none."""
        return self._grid.nearest(self.to_world(pos), HIT_RADIUS_PX / self.scale)

    # -- painting -----------------------------------------------------------------------------
    def _invalidate(self) -> None:
        self._image = None
        self.update()

    def _splat(self) -> QImage:
        """Every point into one ``(h, w)`` ARGB buffer: queries, then the class examples
        (outline, then fill), then the highlight rings; later writes win. The buffer has a
        margin of :data:`_PAD` pixels so that no kernel write needs a bounds check."""
        w, h = max(1, self.width()), max(1, self.height())
        buf = np.full((h + 2 * _PAD, w + 2 * _PAD), _argb(BACKGROUND), np.uint32)
        if len(self.points.xy):
            scr = np.round(self.to_screen(self.points.xy)).astype(np.int64) + _PAD
            sup = self.points.support
            self._stamp(buf, scr[~sup], self._colors[~sup], QUERY_DOT)
            self._stamp(buf, scr[sup], np.full(int(sup.sum()), OUTLINE, np.uint32), SUPPORT_EDGE)
            self._stamp(buf, scr[sup], self._colors[sup], SUPPORT_DOT)
            hi = self._highlight
            self._stamp(buf, scr[hi], np.full(len(hi), HIGHLIGHT, np.uint32), HIGHLIGHT_RING)
        self._buf = np.ascontiguousarray(buf[_PAD:_PAD + h, _PAD:_PAD + w])
        self.paints += 1
        return QImage(self._buf.data, w, h, 4 * w, QImage.Format.Format_RGB32)

    @staticmethod
    def _stamp(buf: np.ndarray, scr: np.ndarray, colors: np.ndarray,
               offsets: tuple[np.ndarray, np.ndarray]) -> None:
        """Write ``colors`` ``(k,)`` at padded pixels ``scr`` ``(k, 2)`` plus each kernel
        offset (one scatter per offset); points whose kernel leaves the buffer are skipped
        (they are off screen)."""
        hp, wp = buf.shape
        x, y = scr[:, 0], scr[:, 1]
        vis = (x >= _PAD) & (x < wp - _PAD) & (y >= _PAD) & (y < hp - _PAD)
        if not vis.any():
            return
        flat = buf.reshape(-1)
        base = y[vis] * wp + x[vis]
        c = colors[vis]
        for dy, dx in zip(offsets[0].tolist(), offsets[1].tolist(), strict=True):
            flat[base + (dy * wp + dx)] = c

    def paintEvent(self, e: QPaintEvent) -> None:
        if self._image is None or self._image.size() != self.size():
            self._image = self._splat()
        p = QPainter(self)
        p.drawImage(0, 0, self._image)
        if self._drag == "rect" and self._press is not None and self._last is not None:
            p.setPen(QPen(QColor("#ffffff"), 1, Qt.PenStyle.DashLine))
            p.drawRect(QRectF(QPointF(self._press), QPointF(self._last)).normalized())
        elif self._drag == "lasso" and len(self._path) > 1:
            p.setPen(QPen(QColor("#ffffff"), 1, Qt.PenStyle.DashLine))
            p.drawPolygon(QPolygonF(self._path))
        if self.hover_index >= 0 and self._thumb is not None and not self._thumb.isNull():
            x, y = self.to_screen(self.points.xy[[self.hover_index]])[0]
            tw, th = self._thumb.width(), self._thumb.height()
            tx = x + 12 if x + 12 + tw < self.width() else x - 12 - tw
            ty = min(max(0.0, y - th / 2), max(0.0, self.height() - th))
            p.fillRect(QRectF(tx - 2, ty - 2, tw + 4, th + 4), QColor("#ffffff"))
            p.drawPixmap(QPointF(tx, ty), self._thumb)
        p.end()

    def resizeEvent(self, e: QResizeEvent) -> None:
        super().resizeEvent(e)
        if e.oldSize().width() <= 0 or self._fit_scale == self.scale:
            self.fit()  # still at the fitted view: fit the new size
        self._invalidate()

    # -- mouse --------------------------------------------------------------------------------
    def _drag_kind(self, e: QMouseEvent) -> str:
        if e.button() != Qt.MouseButton.LeftButton:
            return "pan"
        mods = e.modifiers()
        if mods & Qt.KeyboardModifier.ShiftModifier:
            return "rect"
        if mods & Qt.KeyboardModifier.ControlModifier:
            return "lasso"
        return self.tool

    def mousePressEvent(self, e: QMouseEvent) -> None:
        self._press = self._last = e.position().toPoint()
        self._drag = self._drag_kind(e)
        self._path = [e.position()]
        self._moved = False

    def mouseMoveEvent(self, e: QMouseEvent) -> None:
        pos = e.position().toPoint()
        if self._press is None:
            self._set_hover(self.index_at(pos))
            return
        self._moved = self._moved or (pos - self._press).manhattanLength() > CLICK_SLOP_PX
        if self._drag == "pan" and self._last is not None:
            self.pan_by(pos.x() - self._last.x(), pos.y() - self._last.y())
        elif self._drag == "lasso":
            self._path.append(e.position())
        self._last = pos
        self.update()

    def mouseReleaseEvent(self, e: QMouseEvent) -> None:
        press, drag, pos = self._press, self._drag, e.position().toPoint()
        self._press, self._drag = None, ""
        if press is None:
            return
        if not self._moved and (pos - press).manhattanLength() <= CLICK_SLOP_PX:
            if (i := self.index_at(pos)) >= 0:
                self.clicked.emit(i)
        elif drag == "rect":
            a, b = self.to_world(press), self.to_world(pos)
            lo, hi = np.minimum(a, b), np.maximum(a, b)
            xy = self.points.xy
            self.selected.emit(np.flatnonzero(((xy >= lo) & (xy <= hi)).all(axis=1)).tolist())
        elif drag == "lasso":
            step = max(1, len(self._path) // 256)  # at most ~256 vertices
            poly = np.array([self.to_world(q) for q in self._path[::step]])
            self.selected.emit(np.flatnonzero(points_in_polygon(self.points.xy, poly)).tolist())
        self._path = []
        self.update()

    def _set_hover(self, i: int) -> None:
        if i != self.hover_index:
            self.hover_index, self._thumb = i, None
            self.hovered.emit(i)
            self.update()

    def leaveEvent(self, e: object) -> None:
        self._set_hover(-1)

    def wheelEvent(self, e: QWheelEvent) -> None:
        self.zoom_at(e.position(), 1.0015 ** e.angleDelta().y())


class EmbeddingMapPanel(QWidget):
    """The dock's content: a bar (colour mode, tool, fit, a status line) over the canvas."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        from PySide6.QtWidgets import QComboBox, QHBoxLayout, QLabel, QToolButton, QVBoxLayout

        self.canvas = MapCanvas(self)
        self.color_box = QComboBox()
        for text, mode in (("Predicted class", "class"), ("Confidence", "confidence"),
                           ("Reviewed", "reviewed")):
            self.color_box.addItem(text, mode)
        self.color_box.setToolTip("Colour the points by")
        self.color_box.currentIndexChanged.connect(
            lambda _i: self.canvas.set_color_mode(self.color_box.currentData()))
        self.tool_buttons: dict[str, QToolButton] = {}
        bar = QHBoxLayout()
        bar.setContentsMargins(4, 2, 4, 2)
        bar.addWidget(self.color_box)
        tips = {"pan": "Drag to pan (wheel: zoom)",
                "rect": "Drag a rectangle to assign its images to a class (Shift+drag)",
                "lasso": "Draw a lasso to assign its images to a class (Ctrl+drag)"}
        for tool, text in (("pan", "Pan"), ("rect", "Rectangle"), ("lasso", "Lasso")):
            b = QToolButton()
            b.setText(text)
            b.setCheckable(True)
            b.setAutoExclusive(True)
            b.setToolTip(tips[tool])
            b.clicked.connect(lambda _c=False, t=tool: self.canvas.set_tool(t))
            bar.addWidget(b)
            self.tool_buttons[tool] = b
        self.tool_buttons["pan"].setChecked(True)
        fit = QToolButton()
        fit.setText("Fit")
        fit.setToolTip("Show every point")
        fit.clicked.connect(self.canvas.fit)
        bar.addWidget(fit)
        bar.addStretch(1)
        self.status = QLabel()
        self.status.setObjectName("hintLabel")
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(0)
        layout.addLayout(bar)
        layout.addWidget(self.canvas, 1)
        layout.addWidget(self.status)

    def set_status(self, text: str) -> None:
        self.status.setText(text)
