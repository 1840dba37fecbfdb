"""The detail pane: the selected image large, its prediction and the top-3 classes with
probability bars. The large image is decoded off the UI thread (its own small LRU cache)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from PySide6.QtCore import QEvent, QRectF, QSize, Qt
from PySide6.QtGui import QColor, QPainter, QPixmap
from PySide6.QtWidgets import QLabel, QSizePolicy, QVBoxLayout, QWidget

from fewshot_studio.engine.api import Prediction, Status
from fewshot_studio.gui.thumbnails import ThumbnailCache
from fewshot_studio.gui.views.style import theme


class ImageLabel(QWidget):
    """Paints a pixmap scaled to fit, centred, on a soft background."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.pixmap: QPixmap | None = None
        self.text = "Select an image"
        self.setMinimumSize(QSize(200, 200))
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)

    def set_pixmap(self, pm: QPixmap | None, text: str = "") -> None:
        self.pixmap, self.text = pm, text
        self.update()

    def paintEvent(self, e) -> None:
        p = QPainter(self)
        p.setRenderHint(QPainter.RenderHint.SmoothPixmapTransform)
        p.setRenderHint(QPainter.RenderHint.Antialiasing)
        r = QRectF(self.rect()).adjusted(1, 1, -1, -1)
        p.setPen(Qt.PenStyle.NoPen)
        p.setBrush(theme().color("thumb_bg"))
        p.drawRoundedRect(r, 8, 8)
        if self.pixmap is not None and not self.pixmap.isNull():
            s = self.pixmap.size().scaled(r.size().toSize(), Qt.AspectRatioMode.KeepAspectRatio)
            t = QRectF(0, 0, s.width(), s.height())
            t.moveCenter(r.center())
            p.drawPixmap(t, self.pixmap, QRectF(self.pixmap.rect()))
        elif self.text:
            p.setPen(theme().color("faint"))
            p.drawText(r, Qt.AlignmentFlag.AlignCenter | Qt.TextFlag.TextWordWrap, self.text)


class ProbBar(QWidget):
    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.label, self.prob, self.color = "", 0.0, QColor("#2563eb")
        self.setFixedHeight(24)

    def set(self, label: str, prob: float, color: QColor) -> None:
        self.label, self.prob, self.color = label, prob, color
        self.update()

    def paintEvent(self, e) -> None:
        if not self.label:
            return
        p = QPainter(self)
        p.setRenderHint(QPainter.RenderHint.Antialiasing)
        r = QRectF(self.rect()).adjusted(0, 3, 0, -3)
        p.setPen(Qt.PenStyle.NoPen)
        t = theme()
        p.setBrush(t.color("thumb_bg"))
        p.drawRoundedRect(r, 4, 4)
        fill = QColor(self.color)
        fill.setAlpha(120 if t.dark else 95)
        p.setBrush(fill)
        p.drawRoundedRect(QRectF(r.left(), r.top(), max(6.0, r.width() * self.prob), r.height()),
                          4, 4)
        p.setPen(t.color("text"))
        p.drawText(r.adjusted(8, 0, -8, 0), Qt.AlignmentFlag.AlignVCenter, self.label)
        p.drawText(r.adjusted(8, 0, -8, 0),
                   Qt.AlignmentFlag.AlignVCenter | Qt.AlignmentFlag.AlignRight,
                   f"{self.prob:.1%}")


class DetailPane(QWidget):
    def __init__(self, color_of: Callable[[str], QColor | None],
                 parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("detailPane")
        self.color_of = color_of
        self.images = ThumbnailCache(size=640, capacity=40, threads=1, max_pending=4,
                                     parent=self)
        self.images.ready.connect(self._on_ready)
        self._path: Path | None = None
        lay = QVBoxLayout(self)
        lay.setContentsMargins(8, 12, 12, 12)
        lay.setSpacing(8)
        title = QLabel("Details")
        title.setObjectName("panelTitle")
        lay.addWidget(title)
        self.image = ImageLabel()
        lay.addWidget(self.image, 1)
        self.name = QLabel()
        self.name.setObjectName("detailName")
        self.name.setWordWrap(True)
        self.name.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.verdict = QLabel()
        self.verdict.setObjectName("detailVerdict")
        self.verdict.setWordWrap(True)
        lay.addWidget(self.name)
        lay.addWidget(self.verdict)
        self.bars = [ProbBar() for _ in range(3)]
        for b in self.bars:
            lay.addWidget(b)
        self.hint = QLabel("Enter accepts, keys 1–9 (or a drag onto a class card) correct; "
                           "N: next unreviewed.")
        self.hint.setObjectName("hintLabel")
        self.hint.setWordWrap(True)
        lay.addWidget(self.hint)
        self.show_prediction(None, None)

    def show_prediction(self, path: Path | None, pred: Prediction | None,
                        count: int = 1) -> None:
        self._path = path
        self._shown = (path, pred, count)
        if path is None:
            self.image.set_pixmap(None, "Select an image to see it large")
            self.name.setText("")
            self.verdict.setText("")
            for b in self.bars:
                b.set("", 0.0, QColor())
            return
        t = theme()
        self.image.set_pixmap(self.images.get(path), "Loading…")
        self.name.setText(path.name + (f"   (+{count - 1} more selected)" if count > 1 else ""))
        if pred is None:
            self.verdict.setText("Not labeled yet: press Label (Ctrl+L).")
        elif pred.status == Status.ERROR:
            self.verdict.setText(f"<span style='color:{t.error}'><b>Error:</b> {pred.error}"
                                 "</span>")
        elif pred.corrected:
            self.verdict.setText(f"<b>{pred.label}</b> &nbsp;<span style='color:{t.ok}'>"
                                 "✓ corrected by you</span>")
        elif pred.status == Status.UNKNOWN:
            self.verdict.setText("<b>Unknown</b>: not confident enough to label "
                                 f"(best guess {pred.top[0][0] if pred.top else '-'}).")
        else:
            self.verdict.setText(f"<b>{pred.label}</b> &nbsp; {pred.confidence:.1%} confident, "
                                 f"margin {pred.margin:.2f}")
        tops = list(pred.top) if pred else []
        for i, b in enumerate(self.bars):
            if i < len(tops):
                lab, prob = tops[i]
                b.set(lab, float(prob), self.color_of(lab) or QColor("#2563eb"))
            else:
                b.set("", 0.0, QColor())

    def changeEvent(self, e: QEvent) -> None:
        super().changeEvent(e)
        if e.type() == QEvent.Type.PaletteChange and hasattr(self, "_shown"):
            self.show_prediction(*self._shown)  # the verdict's colours follow the theme

    def _on_ready(self, key: str) -> None:
        if self._path is not None and key == str(self._path):
            err = self.images.error(key)
            self.image.set_pixmap(self.images.get(key), f"Cannot open: {err}" if err else "")
