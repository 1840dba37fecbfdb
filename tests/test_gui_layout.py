"""Layout and look (issue 13): at 1024x640 and at 1360x820 no text is cut short and the class
cards fit their panel; a filtered gallery reflows to the full width; the light and dark themes
(following the system's colour scheme) and their readability.

The window is grabbed offscreen with the app's real style applied, showing a labeled project
with realistic class names and counts; a fake engine (instant, deterministic) stands in for the
model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("pytestqt")

from _gui_helpers import FakeSession as BaseFakeSession
from _gui_helpers import make_image, shown_window
from _gui_helpers import wait_idle as _idle
from PySide6.QtCore import QPoint, Qt
from PySide6.QtGui import QColor, QImage
from PySide6.QtWidgets import (
    QAbstractButton,
    QApplication,
    QLabel,
    QLineEdit,
    QStyle,
    QWidget,
)

from fewshot_studio.engine.api import Prediction, Status
from fewshot_studio.gui import app as gui_app
from fewshot_studio.gui import project_io as pio
from fewshot_studio.gui.main_window import MainWindow
from fewshot_studio.gui.models.gallery import Role
from fewshot_studio.gui.views import style
from fewshot_studio.gui.views.gallery import TILE
from fewshot_studio.gui.views.toolbar import ElidedLabel

CLASSES = ["Airplane", "Motorbike", "Sunflower", "Wrist watch", "Grand piano", "Hedgehog"]
N = 240
SIZES = [(1024, 640), (1360, 820)]


def _index(p: Path) -> int:
    return int(p.stem.split("_")[-1])


class FakeSession(BaseFakeSession):
    """Image i: class i % 6, a confidence spread over 0.2-1.0 (unknown below the threshold),
    every 37th unreadable."""

    backend_info = ("onnxruntime", "cpu")

    def guess(self, index: int, p: Path) -> Prediction:
        i = _index(p)
        if i % 37 == 5:
            return Prediction(p, None, 0.0, 0.0, Status.ERROR, (),
                              "cannot identify image file")
        conf = round(0.2 + 0.8 * ((i * 7) % N) / N, 3)
        lab = self.names[i % len(self.names)]
        top = ((lab, conf), (self.names[(i + 1) % len(self.names)], round(1 - conf, 3)))
        if conf < self.settings.unknown_threshold:
            return Prediction(p, None, conf, 0.1, Status.UNKNOWN, top)
        return Prediction(p, lab, conf, 0.1, Status.OK, top)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("layout")
    query = [make_image(root / "query" / f"IMG_2024_{i:04d}.png", (20 * (i % 10), 90, 160), i,
                        size=24) for i in range(N)]
    support = {n: [make_image(root / "support" / n / f"example_{k}.png", (40 * j, 60, 90),
                              1000 + 10 * j + k, size=24) for k in range(4 + j % 3)]
               for j, n in enumerate(CLASSES)}
    return {"query": query, "folder": root / "query", "support": support}


@pytest.fixture
def styled(qapp: QApplication) -> Iterator[QApplication]:
    """The app's real look (light), undone afterwards (other tests run unstyled)."""
    before = (qapp.style().name(), QApplication.palette(), qapp.styleSheet())
    style.apply_style(qapp, Qt.ColorScheme.Light)
    yield qapp
    qapp.setStyleSheet(before[2])
    qapp.setPalette(before[1])
    qapp.setStyle(before[0])
    style._current = style.LIGHT


@pytest.fixture
def win(qtbot, styled: QApplication, images: dict) -> Iterator[MainWindow]:
    """Labeled: 240 images, six classes, 8 corrected, 3 accepted; least confident first."""
    w = shown_window(qtbot, session_factory=FakeSession)
    w.project.apply(pio.Project(
        classes=[pio.ClassSpec(n, pio.PALETTE[i], images["support"][n])
                 for i, n in enumerate(CLASSES)],
        query_folder=images["folder"], checkpoint="natural-protonet"))
    qtbot.waitUntil(lambda: w.gallery_model.rowCount() == N, timeout=10_000)
    with qtbot.waitSignal(w.labeling.run_finished, timeout=60_000):
        assert w.labeling.label() is not None
    _idle(qtbot, w)
    w.correct_paths([p.resolve() for p in images["query"][10:18]], 1)
    _idle(qtbot, w)
    sort = w.review.sort
    sort.setCurrentIndex(sort.findData(True))
    sort.activated.emit(sort.currentIndex())
    w.gallery.setCurrentIndex(w.proxy.index(0, 0))
    for _ in range(3):
        w.reviewing.accept_selected()
    _idle(qtbot, w)
    yield w
    w.close()



def _settle(qtbot, w: MainWindow, size: tuple[int, int]) -> QImage:
    w.resize(*size)
    qtbot.waitUntil(lambda: (w.width(), w.height()) == size, timeout=5_000)
    qtbot.wait(250)  # the gallery's delayed layout, the review bar's relayout
    img = w.grab().toImage()
    assert (img.width(), img.height()) == (round(size[0] * img.devicePixelRatio()),
                                           round(size[1] * img.devicePixelRatio()))
    return img


def _choose_filter(w: MainWindow, key: str) -> None:
    f = w.review.filter
    i = f.findData(key)
    assert i >= 0, key
    f.setCurrentIndex(i)
    f.activated.emit(i)


def cut_texts(root: QWidget) -> list[str]:
    """Every visible one-line text under ``root`` that does not fit its widget."""
    bad: list[str] = []
    for lab in root.findChildren(QLabel):
        if not lab.isVisibleTo(root) or not lab.text():
            continue
        if isinstance(lab, ElidedLabel):
            if lab.text() != lab.text_full():
                bad.append(f"{lab.objectName()}: {lab.text_full()!r} shown as {lab.text()!r}")
            continue
        rich = lab.textFormat() == Qt.TextFormat.RichText or (
            lab.textFormat() == Qt.TextFormat.AutoText and "<" in lab.text())
        if lab.wordWrap() or rich:
            continue
        adv = lab.fontMetrics().horizontalAdvance(lab.text())
        if adv > lab.contentsRect().width():
            bad.append(f"{lab.objectName() or type(lab).__name__}: {lab.text()!r} needs "
                       f"{adv} px, has {lab.contentsRect().width()}")
    for b in root.findChildren(QAbstractButton):
        text = b.text().replace("&&", "\0").replace("&", "").replace("\0", "&")
        if not b.isVisibleTo(root) or not text:
            continue
        adv = b.fontMetrics().horizontalAdvance(text)
        if adv > b.contentsRect().width():
            bad.append(f"button {text!r} needs {adv} px, has {b.contentsRect().width()}")
    for e in root.findChildren(QLineEdit):  # class names on the cards
        if e.isVisibleTo(root) and e.text():
            room = e.contentsRect().width() - 4  # (QLineEdit's own 2 px margins)
            if e.fontMetrics().horizontalAdvance(e.text()) > room:
                bad.append(f"line edit {e.text()!r} has {room} px")
    return bad


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_no_text_is_cut_and_the_class_cards_fit(qtbot, win: MainWindow, images: dict,
                                                size: tuple[int, int], tmp_path: Path) -> None:
    img = _settle(qtbot, win, size)
    img.save(str(tmp_path / f"window-{size[0]}.png"))  # (kept by pytest for a look)
    # the header line: the counts, whole (on a line of their own when the bar is narrow)
    counts = win.review.counts.text_full()
    assert "240 images" in counts and "8 corrected" in counts and "errors" in counts
    assert win.review.counts.text() == counts
    assert win.review_count.isVisible() and win.review_count.text().startswith("reviewed ")
    assert win.run_summary.isVisible()
    assert cut_texts(win) == []
    # every class card fits the panel's width and is inside the scroll area's content
    scroll = win.class_panel.scroll
    vp = scroll.viewport()
    assert win.class_panel.inner.width() <= vp.width()
    bar = scroll.verticalScrollBar()
    for card in win.class_panel.cards:
        top_left = card.mapTo(vp, QPoint(0, 0))
        assert top_left.x() >= 0 and top_left.x() + card.width() <= vp.width(), card.name.text()
        assert card.minimumSizeHint().width() <= card.width()
        hidden_below = top_left.y() + card.height() - vp.height()
        assert hidden_below <= bar.maximum() - bar.value(), f"{card.name.text()} unreachable"
        for child in card.findChildren(QWidget):
            if child.isVisibleTo(card) and child.parentWidget() is card:
                assert card.rect().contains(child.geometry()), (card.name.text(),
                                                                child.objectName())
    # the toolbar shows all of its widgets (none pushed into its overflow menu)
    for w in (win.toolbar.checkpoint, win.toolbar.backend, win.toolbar.threshold,
              win.toolbar.threshold_value):
        assert w.isVisible() and win.toolbar.rect().contains(w.geometry())
    # and the gallery has as many columns as tiles fit
    assert _columns(win) == win.gallery.viewport().width() // TILE.width()


def _columns(w: MainWindow) -> int:
    xs = {w.gallery.visualRect(w.proxy.index(r, 0)).x()
          for r in range(min(w.proxy.rowCount(), 40))}
    return len(xs)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_a_filtered_gallery_reflows_to_the_full_width(qtbot, win: MainWindow,
                                                      size: tuple[int, int]) -> None:
    _settle(qtbot, win, size)
    g = win.gallery
    assert g.verticalScrollBar().isVisible()  # 240 tiles scroll
    _choose_filter(win, "corrected")
    qtbot.wait(250)
    assert win.proxy.rowCount() == 8
    vp = g.viewport().width()
    cols = vp // TILE.width()
    assert _columns(win) == min(8, cols), f"{_columns(win)} columns in {vp} px"
    right = max(g.visualRect(win.proxy.index(r, 0)).right() for r in range(8))
    assert vp - right < TILE.width()  # no empty strip a tile wide on the right
    assert "showing 8" in win.review.counts.text()
    # back to every image, then a resize while filtered: the columns follow each time
    _choose_filter(win, "all")
    qtbot.wait(250)
    assert _columns(win) == g.viewport().width() // TILE.width()
    _choose_filter(win, "corrected")
    other = SIZES[0] if size == SIZES[1] else SIZES[1]
    _settle(qtbot, win, other)
    assert _columns(win) == min(8, g.viewport().width() // TILE.width())


# -- themes ------------------------------------------------------------------------------------
def _luminance(c: QColor) -> float:
    def lin(v: float) -> float:
        return v / 12.92 if v <= 0.03928 else ((v + 0.055) / 1.055) ** 2.4
    return 0.2126 * lin(c.redF()) + 0.7152 * lin(c.greenF()) + 0.0722 * lin(c.blueF())


def contrast(a: QColor | str, b: QColor | str) -> float:
    la, lb = sorted((_luminance(QColor(a)), _luminance(QColor(b))), reverse=True)
    return (la + 0.05) / (lb + 0.05)


@pytest.mark.parametrize("t", [style.LIGHT, style.DARK], ids=lambda t: t.name)
def test_both_themes_are_readable(t: style.Theme) -> None:
    """Text, secondary text, badges and marks against what they are drawn on (WCAG ratios:
    4.5 for text, 3 for bold badge text and marks)."""
    for fg, bg in (("text", "window"), ("text", "base"), ("muted", "window"), ("muted", "base"),
                   ("text", "accent_soft"), ("muted", "accent_soft"), ("chip_fg", "chip_bg"),
                   ("key_fg", "key_bg"), ("accent_text", "accent"), ("tooltip_fg", "tooltip_bg"),
                   ("unknown_fg", "unknown_fill"), ("ok", "base"), ("error", "base"),
                   ("link", "base"), ("text", "thumb_bg")):
        assert contrast(getattr(t, fg), getattr(t, bg)) >= 4.5, (t.name, fg, bg)
    for fg, bg in (("faint", "base"), ("faint", "window"), ("accent", "base"),
                   ("unknown_outline", "base")):
        assert contrast(getattr(t, fg), getattr(t, bg)) >= 3, (t.name, fg, bg)
    for c in pio.PALETTE:  # class badges: white bold text on the class colour
        assert contrast("#ffffff", c) >= 3, c
    assert (_luminance(QColor(t.window)) < 0.05) == t.dark


def _gallery_background(w: MainWindow) -> QColor:
    """A pixel of the gallery's own background: right of the last tile of a short view."""
    g = w.gallery
    img = g.viewport().grab().toImage()
    last = g.visualRect(w.proxy.index(w.proxy.rowCount() - 1, 0))
    x = min(img.width() - 2, last.right() + 6)
    y = min(img.height() - 2, last.bottom() + 20)
    return img.pixelColor(round(x * img.devicePixelRatio()), round(y * img.devicePixelRatio()))


def _tile_color(w: MainWindow) -> QColor:
    """A pixel of the first tile's card, beside its file name."""
    g = w.gallery
    img = g.viewport().grab().toImage()
    r = g.visualRect(w.proxy.index(0, 0))
    cx = r.center().x() - TILE.width() // 2 + 8
    return img.pixelColor(round(cx * img.devicePixelRatio()),
                          round((r.top() + 150) * img.devicePixelRatio()))


def test_dark_mode_follows_the_system_colour_scheme(qtbot, win: MainWindow,
                                                    styled: QApplication,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(style.THEME_ENV, raising=False)
    _settle(qtbot, win, (1360, 820))
    _choose_filter(win, "corrected")  # a short view: the gallery's background shows
    qtbot.wait(250)
    pal = QApplication.palette()
    assert pal.color(pal.ColorRole.Window) == QColor(style.LIGHT.window)
    assert pal.color(pal.ColorRole.WindowText) == QColor(style.LIGHT.text)
    assert _luminance(_gallery_background(win)) > 0.8
    assert _luminance(_tile_color(win)) > 0.8
    # the system switches to dark: make_app connected the app to colorSchemeChanged
    gui_app.make_app()
    styled.styleHints().colorSchemeChanged.emit(Qt.ColorScheme.Dark)
    qtbot.wait(100)
    assert style.theme() is style.DARK
    pal = QApplication.palette()
    assert pal.color(pal.ColorRole.Window) == QColor(style.DARK.window)
    assert pal.color(pal.ColorRole.WindowText) == QColor(style.DARK.text)
    assert pal.color(pal.ColorRole.Base) == QColor(style.DARK.base)
    assert _luminance(_gallery_background(win)) < 0.02  # the gallery renders dark
    assert _luminance(_tile_color(win)) < 0.05  # and so do its tiles (not cached light ones)
    assert style.DARK.window in styled.styleSheet()
    assert cut_texts(win) == []
    # and back to light
    styled.styleHints().colorSchemeChanged.emit(Qt.ColorScheme.Light)
    qtbot.wait(100)
    assert style.theme() is style.LIGHT
    assert _luminance(_gallery_background(win)) > 0.8
    assert _luminance(_tile_color(win)) > 0.8


def test_the_theme_can_be_fixed_by_the_environment(styled: QApplication,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(style.THEME_ENV, "dark")
    assert style.apply_style(styled) is style.DARK
    styled.styleHints().colorSchemeChanged.emit(Qt.ColorScheme.Light)  # ignored: fixed
    assert style.theme() is style.DARK
    arrow = style.arrow_icon(style.DARK)
    assert arrow.is_file() and style.DARK.muted in arrow.read_text()
    monkeypatch.setenv(style.THEME_ENV, "light")
    assert style.apply_style(styled) is style.LIGHT
    monkeypatch.setenv(style.THEME_ENV, "")
    unknown = styled.styleHints().colorScheme() == Qt.ColorScheme.Unknown
    assert style.apply_style(styled) is (style.LIGHT if unknown else style.theme())


def test_the_scroll_bar_extent_is_its_width(styled: QApplication, qtbot) -> None:
    """The gallery's columns depend on it: QListView reserves the scroll bar's extent."""
    w = shown_window(qtbot, session_factory=FakeSession)
    g = w.gallery
    extent = g.style().pixelMetric(QStyle.PixelMetric.PM_ScrollBarExtent, None,
                                   g.verticalScrollBar())
    assert extent == 10
    assert g.layout_width() == g.maximumViewportSize().width() - extent
    assert g.gridSize().width() * g.columns() <= g.layout_width() - 1
    w.close()


def test_a_theme_switch_renders_the_tiles_again(qtbot, win: MainWindow,
                                                       styled: QApplication) -> None:
    """The delegate's cache is keyed by the theme: a switch re-renders the selected tile."""
    _settle(qtbot, win, (1360, 820))
    ix = win.gallery.currentIndex()
    assert ix.isValid() and ix.data(Role.PATH) is not None
    d = win.gallery.itemDelegate()
    before = d.rendered
    style.apply_style(styled, Qt.ColorScheme.Dark)
    win.gallery.viewport().repaint()
    assert d.rendered > before
    style.apply_style(styled, Qt.ColorScheme.Light)
