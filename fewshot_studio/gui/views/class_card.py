"""A class card: key number, colour, editable name, example count and example thumbnails
(:class:`ExamplesView`). Image files / folders dropped on a card become its examples; gallery
tiles dropped on it are corrected to it. Suspicious examples get a warning badge
(:func:`badged`) and a line with a *Fix* menu. The card reads and acts through its
:class:`CardHost` (the class panel)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from PySide6.QtCore import QMimeData, QRectF, QSize, Qt, Signal
from PySide6.QtGui import (
    QColor,
    QDragEnterEvent,
    QDropEvent,
    QFont,
    QIcon,
    QKeySequence,
    QPainter,
    QPen,
    QPixmap,
)
from PySide6.QtWidgets import (
    QAbstractItemView,
    QColorDialog,
    QFileDialog,
    QFrame,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListView,
    QListWidget,
    QListWidgetItem,
    QMenu,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from fewshot_studio.gui.controllers.classes import ClassesController
from fewshot_studio.gui.models.classes import ClassListModel
from fewshot_studio.gui.thumbnails import ThumbnailCache
from fewshot_studio.gui.views.style import theme

QUERY_MIME = "application/x-fewshot-query-paths"
# An example item's data: the class it looks like ("" when not suspicious)
SUSPICIOUS_ROLE = Qt.ItemDataRole.UserRole + 1
_BADGE_FILL, _BADGE_TEXT = "#f59e0b", "#1f2937"  # amber, dark "!": reads in both themes
_WARN_TEXT = {False: "#b45309", True: "#fbbf24"}  # the card's warning line, light / dark
_BADGE_CANVAS = 96  # px: thumbnails are drawn at this size with the badge, shown at 48


class CardHost(Protocol):
    """What a card uses of the panel that holds it."""

    model: ClassListModel
    ctl: ClassesController
    thumbs: ThumbnailCache
    corrected: dict[str, int]  # class name -> corrected images joining it
    suspicious: dict[Path, str]  # example -> the class it looks like

    def move_example(self, path: Path, row: int, to_name: str) -> None: ...
    def correct_to(self, paths: list[Path], row: int) -> None: ...
    def set_current(self, row: int) -> None: ...


def badged(pm: QPixmap | None) -> QPixmap:
    """A thumbnail (or an empty square when not loaded yet) with a warning badge drawn at
    its top right."""
    n = _BADGE_CANVAS
    canvas = QPixmap(n, n)
    canvas.fill(Qt.GlobalColor.transparent)
    p = QPainter(canvas)
    p.setRenderHint(QPainter.RenderHint.Antialiasing)
    if pm is not None and not pm.isNull():
        img = pm.scaled(n, n, Qt.AspectRatioMode.KeepAspectRatio,
                        Qt.TransformationMode.SmoothTransformation)
        p.drawPixmap((n - img.width()) // 2, (n - img.height()) // 2, img)
    d = n * 0.42
    r = QRectF(n - d - 1, 1, d, d)
    p.setPen(QPen(QColor("#ffffff"), 3))
    p.setBrush(QColor(_BADGE_FILL))
    p.drawEllipse(r)
    f = QFont()
    f.setBold(True)
    f.setPixelSize(int(d * 0.72))
    p.setFont(f)
    p.setPen(QColor(_BADGE_TEXT))
    p.drawText(r, Qt.AlignmentFlag.AlignCenter, "!")
    p.end()
    return canvas


def local_paths(mime: QMimeData) -> list[Path]:
    return [Path(u.toLocalFile()) for u in mime.urls() if u.isLocalFile()]


def query_paths(mime: QMimeData) -> list[Path]:
    if not mime.hasFormat(QUERY_MIME):
        return []
    text = bytes(mime.data(QUERY_MIME).data()).decode("utf-8")
    return [Path(s) for s in text.split("\n") if s]


class ExamplesView(QListWidget):
    """A card's example thumbnails; a drop target for files and gallery tiles."""

    def __init__(self, card: ClassCard) -> None:
        super().__init__(card)
        self.card = card
        self.setViewMode(QListView.ViewMode.IconMode)
        self.setFlow(QListView.Flow.LeftToRight)
        self.setWrapping(True)
        self.setResizeMode(QListView.ResizeMode.Adjust)
        self.setIconSize(QSize(48, 48))
        self.setGridSize(QSize(54, 54))
        self.setFixedHeight(64)
        self.setMovement(QListView.Movement.Static)
        self.setSelectionMode(QAbstractItemView.SelectionMode.ExtendedSelection)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.setVerticalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.setAcceptDrops(True)
        self.setDragEnabled(False)
        self.setDropIndicatorShown(False)
        self.setContextMenuPolicy(Qt.ContextMenuPolicy.CustomContextMenu)
        self.customContextMenuRequested.connect(self._menu)
        self.setObjectName("examplesView")

    def fit_height(self) -> None:
        """Grow with the examples (wrapping rows), up to three rows, then scroll."""
        per_row = max(1, (self.width() - 4) // self.gridSize().width())
        needed = max(1, -(-self.count() // per_row))
        rows = min(3, needed)
        self.setVerticalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAsNeeded if needed > 3
                                        else Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.setFixedHeight(rows * self.gridSize().height() + 8)

    def resizeEvent(self, e) -> None:
        super().resizeEvent(e)
        self.fit_height()

    def selected_paths(self) -> list[Path]:
        return [Path(i.data(Qt.ItemDataRole.UserRole)) for i in self.selectedItems()]

    def keyPressEvent(self, e) -> None:
        if (e.matches(QKeySequence.StandardKey.Delete) or e.key() in (
                Qt.Key.Key_Delete, Qt.Key.Key_Backspace)) and self.selectedItems():
            self.card.remove_selected()
            return
        super().keyPressEvent(e)

    def _menu(self, pos) -> None:
        m = QMenu(self)
        it = self.itemAt(pos)
        looks = it.data(SUSPICIOUS_ROLE) if it is not None else ""
        if looks:
            path = Path(it.data(Qt.ItemDataRole.UserRole))
            self.card.add_fix_actions(m, path, looks)
            m.addSeparator()
        rm = m.addAction("Remove selected examples")
        rm.setEnabled(bool(self.selectedItems()))
        rm.triggered.connect(self.card.remove_selected)
        m.addAction("Add images…").triggered.connect(self.card.browse_images)
        m.exec(self.viewport().mapToGlobal(pos))

    def dragEnterEvent(self, e: QDragEnterEvent) -> None:
        self.card.drag_enter(e)

    def dragMoveEvent(self, e) -> None:
        self.card.drag_enter(e)

    def dragLeaveEvent(self, e) -> None:
        self.card.set_drop_highlight(False)

    def dropEvent(self, e: QDropEvent) -> None:
        self.card.drop(e)

    def paintEvent(self, e) -> None:
        super().paintEvent(e)
        if self.count() == 0:
            from PySide6.QtGui import QPainter

            p = QPainter(self.viewport())
            p.setPen(theme().color("faint"))
            p.drawText(self.viewport().rect(), Qt.AlignmentFlag.AlignCenter,
                       "Drop example images here")


class ClassCard(QFrame):
    activated = Signal(int)

    def __init__(self, row: int, panel: CardHost, parent: QWidget) -> None:
        super().__init__(parent)
        self.row, self.panel = row, panel
        self.ctl: ClassesController = panel.ctl
        self.setObjectName("classCard")
        self.setAcceptDrops(True)
        self._items: dict[str, QListWidgetItem] = {}
        lay = QVBoxLayout(self)
        lay.setContentsMargins(10, 8, 10, 8)
        lay.setSpacing(6)
        head = QHBoxLayout()
        head.setSpacing(6)
        self.key = QLabel()
        self.key.setObjectName("keyHint")
        self.key.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.key.setFixedSize(20, 20)
        self.swatch = QToolButton()
        self.swatch.setObjectName("swatch")
        self.swatch.setFixedSize(18, 18)
        self.swatch.setToolTip("Change colour")
        self.swatch.clicked.connect(self.choose_color)
        self.name = QLineEdit()
        self.name.setObjectName("className")
        self.name.setFrame(False)
        self.name.editingFinished.connect(self._rename)
        self.count = QLabel()
        self.count.setObjectName("countLabel")
        self.count.setWordWrap(True)  # a narrow panel: two lines, never a clipped card
        more = QToolButton()
        more.setText("⋯")
        more.setObjectName("moreButton")
        more.setFixedWidth(24)  # (the name gets the room)
        more.setPopupMode(QToolButton.ToolButtonPopupMode.InstantPopup)
        menu = QMenu(more)
        menu.addAction("Add images…").triggered.connect(self.browse_images)
        menu.addAction("Change colour…").triggered.connect(self.choose_color)
        menu.addSeparator()
        menu.addAction("Remove class").triggered.connect(lambda: self.ctl.remove_class(self.row))
        more.setMenu(menu)
        for w in (self.key, self.swatch, self.name, more):
            head.addWidget(w)
        head.setStretch(2, 1)
        lay.addLayout(head)
        lay.addWidget(self.count)
        warn_row = QHBoxLayout()
        warn_row.setSpacing(4)
        self.warn = QLabel()  # "⚠ 1 example looks like Red"
        self.warn.setObjectName("suspiciousLabel")
        self.warn.setWordWrap(True)
        self.fix = QToolButton()
        self.fix.setObjectName("fixButton")
        self.fix.setText("Fix…")
        self.fix.setToolTip("Move or remove the examples that look like another class")
        self.fix.setPopupMode(QToolButton.ToolButtonPopupMode.InstantPopup)
        self.fix.setMenu(QMenu(self.fix))
        warn_row.addWidget(self.warn, 1)
        warn_row.addWidget(self.fix)
        lay.addLayout(warn_row)
        self.warn.hide()
        self.fix.hide()
        self._flags: dict[str, str] = {}  # example key -> the class it looks like
        self.examples = ExamplesView(self)
        lay.addWidget(self.examples)
        self.refresh()

    @property
    def model(self) -> ClassListModel:
        return self.panel.model

    def refresh(self) -> None:
        spec = self.model.spec(self.row)
        self.key.setText(str(self.row + 1) if self.row < 9 else "")
        self.key.setToolTip(f"Press {self.row + 1} to correct selected tiles to this class")
        if not self.name.hasFocus():
            self.name.setText(spec.name)
            self.name.setCursorPosition(0)
        self.swatch.setStyleSheet(f"background:{spec.color}; border-radius:9px; border:none;")
        self.setStyleSheet(f"#classCard {{ border-left: 4px solid {spec.color}; }}")
        n = len(spec.examples)
        corrected = self.panel.corrected.get(spec.name, 0)
        text = f"{n} example{'s' if n != 1 else ''}"
        if corrected:
            text += f" + {corrected} corrected"
        self.count.setText(text + (" · drop images to add more" if n else ""))
        self.count.setToolTip("Corrected images join the examples (Label > Corrected images "
                              "join the examples)" if corrected else "")
        keys = [str(p) for p in spec.examples]
        if list(self._items) != keys:
            self.examples.clear()
            self._items = {}
            for k in keys:
                it = QListWidgetItem()
                it.setData(Qt.ItemDataRole.UserRole, k)
                it.setToolTip(Path(k).name)
                it.setSizeHint(QSize(52, 52))
                self.examples.addItem(it)
                self._items[k] = it
            self._flags = {}
            for k in keys:
                self.set_thumb(k)
            self.examples.fit_height()
        self._refresh_suspicious(spec.name, keys)

    def suspicious(self) -> dict[Path, str]:
        """This class's examples that look like another (existing) class: path -> its name."""
        spec = self.model.spec(self.row)
        names = set(self.model.names())
        found = self.panel.suspicious
        return {p: lab for p in spec.examples
                if (lab := found.get(p)) and lab != spec.name and lab in names}

    def _refresh_suspicious(self, name: str, keys: list[str]) -> None:
        """Badges, the warning line and the Fix menu from the panel's suspicious map."""
        flagged = self.suspicious()
        flags = {str(p): lab for p, lab in flagged.items()}
        if flags != self._flags:
            old, self._flags = self._flags, flags
            for k in set(old) | set(flags):
                it = self._items.get(k)
                if it is None:
                    continue
                lab = flags.get(k, "")
                it.setData(SUSPICIOUS_ROLE, lab)
                it.setToolTip(f"{Path(k).name}\nLooks like “{lab}”: right-click to move or "
                              "remove it" if lab else Path(k).name)
                self.set_thumb(k)
        self.warn.setVisible(bool(flagged))
        self.fix.setVisible(bool(flagged))
        menu = self.fix.menu()
        menu.clear()
        if not flagged:
            return
        n, targets = len(flagged), sorted(set(flagged.values()))
        what = f"“{targets[0]}”" if len(targets) == 1 else "other classes"
        self.warn.setText(f"⚠ {n} example{' looks' if n == 1 else 's look'} like {what}")
        self.warn.setStyleSheet(f"color: {_WARN_TEXT[theme().dark]};")
        self.warn.setToolTip("Left out, these examples are predicted as another class: "
                             "a wrong example misleads every label")
        if n == 1:
            path, lab = next(iter(flagged.items()))
            self.add_fix_actions(menu, path, lab)
            return
        for path, lab in flagged.items():
            self.add_fix_actions(menu.addMenu(f"{path.name} (looks like “{lab}”)"), path, lab)

    def add_fix_actions(self, menu: QMenu, path: Path, looks: str) -> None:
        """"Move to “looks”" and "Remove" for example ``path`` into ``menu``."""
        mv = menu.addAction(f"Move to “{looks}”")
        mv.setObjectName("moveExample")
        mv.triggered.connect(lambda: self.panel.move_example(path, self.row, looks))
        rm = menu.addAction("Remove example")
        rm.setObjectName("removeExample")
        rm.triggered.connect(lambda: self.ctl.remove_examples(self.row, [path]))

    def set_thumb(self, key: str) -> None:
        it = self._items.get(key)
        if it is None:
            return
        pm = self.panel.thumbs.get(key)
        if self._flags.get(key):
            it.setIcon(QIcon(badged(pm)))
        elif pm is not None:
            it.setIcon(QIcon(pm))
        else:
            it.setIcon(QIcon())

    def _rename(self) -> None:
        if not self.ctl.rename_class(self.row, self.name.text()):
            self.name.setText(self.model.spec(self.row).name)

    def choose_color(self) -> None:
        c = QColorDialog.getColor(QColor(self.model.spec(self.row).color), self, "Class colour")
        if c.isValid():
            self.ctl.set_color(self.row, c.name())

    def browse_images(self) -> None:
        files, _ = QFileDialog.getOpenFileNames(
            self, "Add example images", "", "Images (*.jpg *.jpeg *.png *.bmp *.gif *.tif "
            "*.tiff *.webp);;All files (*)")
        if files:
            self.ctl.add_examples(self.row, [Path(f) for f in files])

    def remove_selected(self) -> None:
        self.ctl.remove_examples(self.row, self.examples.selected_paths())

    # -- drag and drop -------------------------------------------------------------------------
    def set_drop_highlight(self, on: bool) -> None:
        self.setProperty("dropTarget", on)
        self.style().unpolish(self)
        self.style().polish(self)

    def drag_enter(self, e) -> None:
        m = e.mimeData()
        if m.hasFormat(QUERY_MIME) or local_paths(m):
            e.setDropAction(Qt.DropAction.CopyAction)
            e.accept()
            self.set_drop_highlight(True)
        else:
            e.ignore()

    def drop(self, e: QDropEvent) -> None:
        self.set_drop_highlight(False)
        m = e.mimeData()
        if qs := query_paths(m):
            self.panel.correct_to(qs, self.row)
        elif ps := local_paths(m):
            self.ctl.add_examples(self.row, ps)
        else:
            e.ignore()
            return
        e.setDropAction(Qt.DropAction.CopyAction)
        e.accept()

    def dragEnterEvent(self, e: QDragEnterEvent) -> None:
        self.drag_enter(e)

    def dragMoveEvent(self, e) -> None:
        self.drag_enter(e)

    def dragLeaveEvent(self, e) -> None:
        self.set_drop_highlight(False)

    def dropEvent(self, e: QDropEvent) -> None:
        self.drop(e)

    def mousePressEvent(self, e) -> None:
        self.panel.set_current(self.row)
        super().mousePressEvent(e)
