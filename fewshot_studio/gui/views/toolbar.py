"""The main toolbar (checkpoint picker, backend indicator, Label, unknown threshold) and the
review bar above the gallery (filter, sort, counts).

None of these take the keyboard unless clicked (``ClickFocus``): the gallery keeps it for the
review keys. The checkpoint picker never switches model on arrow / Home / End / PageUp /
PageDown keys or the mouse wheel (a closed combo box would, and End would pick "Open
checkpoint…"); it switches only through its popup."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QEvent, QSize, Qt, QTimer, Signal
from PySide6.QtGui import QAction, QKeyEvent, QWheelEvent
from PySide6.QtWidgets import (
    QComboBox,
    QGridLayout,
    QLabel,
    QSizePolicy,
    QSlider,
    QToolBar,
    QWidget,
)

OPEN_CHECKPOINT = "__open__"
_POPUP_KEYS = {Qt.Key.Key_Space, Qt.Key.Key_F4, Qt.Key.Key_Select}


class PopupOnlyComboBox(QComboBox):
    """A combo box that changes its choice only through its popup (click, Space, F4 or
    Alt+Down open it). Keys that would silently switch a closed combo box (arrows, Home,
    End, PageUp, PageDown, typing a name) and the wheel are passed on instead. Takes the
    keyboard only when clicked."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setFocusPolicy(Qt.FocusPolicy.ClickFocus)

    def keyPressEvent(self, e: QKeyEvent) -> None:
        alt = bool(e.modifiers() & Qt.KeyboardModifier.AltModifier)
        if e.key() in _POPUP_KEYS or (alt and e.key() in (Qt.Key.Key_Down, Qt.Key.Key_Up)):
            super().keyPressEvent(e)
        else:
            e.ignore()

    def wheelEvent(self, e: QWheelEvent) -> None:
        e.ignore()


THRESHOLD_TIP = "Predictions less confident than this are marked unknown"
ADAPTIVE_TIP = ("Label > Adaptive unknown rule is on: which images are unknown is read off "
                "your class examples (held out in turn), not set here. With one example a "
                "class nothing can be held out, and this threshold still applies.")


class MainToolBar(QToolBar):
    """``checkpoint_chosen(name_or_path)``, ``open_checkpoint_requested``,
    ``threshold_changed(float)`` (debounced)."""

    checkpoint_chosen = Signal(str)
    open_checkpoint_requested = Signal()
    threshold_changed = Signal(float)

    def __init__(self, label_action: QAction, parent: QWidget | None = None) -> None:
        super().__init__("Main", parent)
        self.setObjectName("mainToolBar")
        self.setMovable(False)
        self.setIconSize(QSize(18, 18))
        self.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
        self.addWidget(_caption("Model"))
        self.checkpoint = PopupOnlyComboBox()
        self.checkpoint.setObjectName("checkpointCombo")
        self.checkpoint.setMinimumWidth(190)
        self.checkpoint.setToolTip("The few-shot model that labels your images")
        self.checkpoint.activated.connect(self._on_activated)
        self.addWidget(self.checkpoint)
        self.backend = QLabel("not loaded")
        self.backend.setObjectName("backendChip")
        self.backend.setToolTip("The backend and device that run the model")
        self.addWidget(self.backend)
        self.addSeparator()
        self.label_action = label_action
        self.addAction(label_action)
        btn = self.widgetForAction(label_action)
        if btn is not None:
            btn.setObjectName("labelButton")
            btn.setFocusPolicy(Qt.FocusPolicy.NoFocus)  # Ctrl+L; the keys stay in the gallery
        self.addSeparator()
        self.threshold_caption = _caption("Unknown below")
        self.addWidget(self.threshold_caption)
        self.threshold = QSlider(Qt.Orientation.Horizontal)
        self.threshold.setObjectName("thresholdSlider")
        self.threshold.setRange(0, 100)
        self.threshold.setFixedWidth(140)
        self.threshold.setToolTip(THRESHOLD_TIP)
        self.threshold.setFocusPolicy(Qt.FocusPolicy.ClickFocus)
        self.threshold_value = QLabel()
        self.threshold_value.setObjectName("thresholdValue")
        self.threshold_value.setMinimumWidth(36)
        self.addWidget(self.threshold)
        self.addWidget(self.threshold_value)
        spacer = QWidget()
        spacer.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)
        self.addWidget(spacer)
        self._debounce = QTimer(self, singleShot=True, interval=150)
        self._debounce.timeout.connect(
            lambda: self.threshold_changed.emit(self.threshold.value() / 100))
        self.threshold.valueChanged.connect(self._on_slider)
        self._items: list[str] = []
        self._fix_metrics()

    def _fix_metrics(self) -> None:
        """Margins and spacing of our own: the style's would change with a theme switch
        (a re-polished tool bar reads other metrics than a new one)."""
        lay = self.layout()
        if lay is not None:
            lay.setContentsMargins(8, 4, 8, 4)
            lay.setSpacing(6)

    def changeEvent(self, e: QEvent) -> None:
        super().changeEvent(e)
        if e.type() == QEvent.Type.StyleChange:
            self._fix_metrics()

    def set_checkpoints(self, bundled: dict[str, Path], current: str) -> None:
        self.checkpoint.blockSignals(True)
        self.checkpoint.clear()
        self._items = []
        for name in bundled:
            self.checkpoint.addItem(name, name)
            self._items.append(name)
        if current and current not in bundled:
            self.checkpoint.addItem(Path(current).name, current)
            self._items.append(current)
        if not self._items:
            self.checkpoint.addItem("(no bundled checkpoints)", "")
            self._items.append("")
        self.checkpoint.insertSeparator(self.checkpoint.count())
        self.checkpoint.addItem("Open checkpoint…", OPEN_CHECKPOINT)
        if current in self._items:
            self.checkpoint.setCurrentIndex(self._items.index(current))
        self.checkpoint.blockSignals(False)

    def current_checkpoint(self) -> str:
        d = self.checkpoint.currentData()
        return "" if d in (None, OPEN_CHECKPOINT) else str(d)

    def _on_activated(self, i: int) -> None:
        d = self.checkpoint.itemData(i)
        if d == OPEN_CHECKPOINT:
            self.open_checkpoint_requested.emit()
        elif d:
            self.checkpoint_chosen.emit(str(d))

    def set_threshold(self, value: float) -> None:
        self.threshold.blockSignals(True)
        self.threshold.setValue(round(value * 100))
        self.threshold.blockSignals(False)
        self.threshold_value.setText(f"{value:.0%}")

    def set_adaptive_rule(self, on: bool) -> None:
        """Label > Adaptive unknown rule: the rule is read off the class examples, so the
        threshold slider is disabled (its tooltip says why); off: the slider is the rule."""
        tip = ADAPTIVE_TIP if on else THRESHOLD_TIP
        for w in (self.threshold_caption, self.threshold, self.threshold_value):
            w.setEnabled(not on)
            w.setToolTip(tip)

    def _on_slider(self, v: int) -> None:
        self.threshold_value.setText(f"{v}%")
        self._debounce.start()

    def set_backend(self, text: str) -> None:
        """``str(BackendInfo)``, e.g. "onnxruntime (CPU), CPUExecutionProvider": shown short
        ("ONNX Runtime · CPU"), in full in the tooltip."""
        head = text.split(",")[0]
        for raw, nice in (("onnxruntime", "ONNX Runtime"), ("torch", "PyTorch")):
            head = head.replace(raw, nice)
        self.backend.setText(head.replace(" (", " · ").replace(")", ""))
        self.backend.setToolTip(f"Runs on: {text}")

    def set_backend_error(self, message: str) -> None:
        """The chosen checkpoint cannot be used: say so in the chip (the reason in its
        tooltip)."""
        self.backend.setText("cannot load")
        self.backend.setToolTip(message)


def _caption(text: str) -> QLabel:
    lab = QLabel(text)
    lab.setObjectName("toolbarCaption")
    return lab


class ElidedLabel(QLabel):
    """A one-line label that elides (…) instead of demanding width (the full text is in
    ``text_full()`` and the tooltip)."""

    def __init__(self, text: str = "", parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._full = text
        self.setText(text)

    def setText(self, text: str) -> None:
        self._full = text
        self.setToolTip(text)
        self._elide()

    def text_full(self) -> str:
        return self._full

    def full_width(self) -> int:
        """The width that shows the whole text: its advance plus the contents margins."""
        m = self.contentsMargins()
        return self.fontMetrics().horizontalAdvance(self._full) + m.left() + m.right() + 2

    def resizeEvent(self, e) -> None:
        super().resizeEvent(e)
        self._elide()

    def _elide(self) -> None:
        shown = self.fontMetrics().elidedText(self._full, Qt.TextElideMode.ElideRight,
                                              max(10, self.contentsRect().width()))
        super().setText(shown)


class ReviewBar(QWidget):
    """Filter and sort controls above the gallery, and the counts: on the title's line when
    they fit there, else on a line of their own below (never cut short at a usual width)."""

    filter_changed = Signal(str)
    sort_changed = Signal(bool)  # True: least confident first

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("reviewBar")
        self.grid = lay = QGridLayout(self)
        lay.setContentsMargins(12, 10, 12, 6)
        lay.setHorizontalSpacing(8)
        lay.setVerticalSpacing(2)
        self.title = QLabel("Images")
        self.title.setObjectName("panelTitle")
        self.counts = ElidedLabel()
        self.counts.setObjectName("countsLabel")
        self.filter = QComboBox()
        self.filter.setObjectName("filterCombo")
        self.sort = QComboBox()
        self.sort.setObjectName("sortCombo")
        self.sort.addItem("By file name", False)
        self.sort.addItem("Least confident first", True)
        self.sort.setToolTip("Sort order: review the least confident images first")
        self.filter.setToolTip("Show only some images")
        for combo in (self.filter, self.sort):
            combo.setFocusPolicy(Qt.FocusPolicy.ClickFocus)
            combo.setSizeAdjustPolicy(
                QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
            combo.setMinimumContentsLength(13)
            combo.setMaximumWidth(185)
        self.counts.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        self.counts.setMinimumWidth(60)
        lay.addWidget(self.title, 0, 0)
        lay.addWidget(self.filter, 0, 2)
        lay.addWidget(self.sort, 0, 3)
        lay.setColumnStretch(1, 1)
        self.wrapped: bool | None = None  # the counts on a line of their own
        self._place_counts()
        self.filter.activated.connect(lambda i: self.filter_changed.emit(self.filter.itemData(i)))
        self.sort.activated.connect(lambda i: self.sort_changed.emit(bool(self.sort.itemData(i))))
        self.set_classes([])

    def _place_counts(self) -> None:
        lay = self.grid
        m = lay.contentsMargins()
        beside = (m.left() + m.right() + 3 * lay.horizontalSpacing()
                  + sum(w.sizeHint().width() for w in (self.title, self.filter, self.sort)))
        wrapped = beside + self.counts.full_width() > self.width()
        if wrapped == self.wrapped:
            return
        self.wrapped = wrapped
        lay.removeWidget(self.counts)
        if wrapped:
            lay.addWidget(self.counts, 1, 0, 1, 4)
        else:
            lay.addWidget(self.counts, 0, 1)

    def resizeEvent(self, e) -> None:
        super().resizeEvent(e)
        self._place_counts()

    def set_classes(self, names: list[str]) -> None:
        cur = self.filter.currentData() or "all"
        self.filter.blockSignals(True)
        self.filter.clear()
        for text, key in [("All images", "all"), ("Unreviewed", "unreviewed"),
                          ("Unknown", "unknown"),
                          ("Corrected", "corrected"), ("Errors", "error"),
                          ("Not labeled", "unlabeled"), ("Duplicates", "duplicate")]:
            self.filter.addItem(text, key)
        self.filter.insertSeparator(self.filter.count())
        for n in names:
            self.filter.addItem(f"Class: {n}", f"class:{n}")
        i = self.filter.findData(cur)
        self.filter.setCurrentIndex(max(0, i))
        self.filter.blockSignals(False)
        if i < 0 and cur != "all":
            self.filter_changed.emit("all")

    def show_filter(self, key: str) -> None:
        """Show filter ``key`` as chosen (without emitting ``filter_changed``)."""
        self.filter.blockSignals(True)
        self.filter.setCurrentIndex(max(0, self.filter.findData(key)))
        self.filter.blockSignals(False)

    def set_counts(self, text: str) -> None:
        self.counts.setText(text)
        self._place_counts()
