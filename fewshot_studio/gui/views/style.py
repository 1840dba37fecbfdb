"""The app's look: Fusion style, a light and a dark theme (palette + one style sheet made
from the theme's colours), following the system's colour scheme (Qt 6.5+
``QStyleHints.colorScheme``, and its ``colorSchemeChanged`` signal while the app runs).

``FEWSHOT_STUDIO_THEME=light`` or ``dark`` overrides the system (for screenshots, or a desktop
that does not report its scheme). Custom-painted parts (gallery tiles, the detail pane) take
their colours from :func:`theme` when they paint."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from string import Template

from PySide6.QtCore import Qt
from PySide6.QtGui import QColor, QFont, QPalette
from PySide6.QtWidgets import QApplication

from fewshot_studio import paths

THEME_ENV = "FEWSHOT_STUDIO_THEME"
_ICON_STROKE = "#4b5563"  # the bundled chevron's colour


@dataclass(frozen=True)
class Theme:
    """Named colours (``#rrggbb``). Class colours are the user's; badges always draw white
    text on them, which reads in both themes."""

    name: str
    window: str  # the window and the panels' background (also the gallery's)
    base: str  # inputs, cards, tiles, the tool and status bars
    alt_base: str  # the examples strip in a card
    text: str
    muted: str  # secondary text (captions, counts, file names on tiles)
    faint: str  # placeholders ("Drop example images here")
    border: str
    border_hover: str
    divider: str  # splitter handles, bar edges
    accent: str
    accent_hover: str
    accent_disabled: str
    accent_text: str  # text on the accent colour
    link: str  # accent-coloured text (the "+ Class" button)
    accent_soft: str  # selected tile / menu item background
    chip_bg: str
    chip_fg: str
    key_bg: str  # the class's key number on its card
    key_fg: str
    thumb_bg: str  # behind a thumbnail, the detail image and probability bars
    track: str  # the confidence bar's and slider's track
    scroll_handle: str
    scroll_handle_hover: str
    tile_border: str
    tile_border_hover: str
    error: str
    ok: str  # corrected by the user
    reviewed: str  # accepted by the user
    unknown_fill: str
    unknown_fg: str
    unknown_outline: str
    tooltip_bg: str
    tooltip_fg: str

    @property
    def dark(self) -> bool:
        return self.name == "dark"

    def color(self, field: str) -> QColor:
        return QColor(getattr(self, field))


LIGHT = Theme(
    name="light", window="#f4f6f9", base="#ffffff", alt_base="#f8f9fb", text="#111827",
    muted="#636a77", faint="#7a8395", border="#d5dbe5", border_hover="#9fb3d9",
    divider="#e3e7ee", accent="#2563eb", accent_hover="#1d4ed8", accent_disabled="#93b4f5",
    accent_text="#ffffff", link="#2563eb", accent_soft="#eaf1ff",
    chip_bg="#eef2ff", chip_fg="#3730a3",
    key_bg="#111827", key_fg="#ffffff", thumb_bg="#f0f2f5", track="#e5e7eb",
    scroll_handle="#c9d0db", scroll_handle_hover="#a9b3c2", tile_border="#e1e5ec",
    tile_border_hover="#c7cdd8", error="#dc2626", ok="#15803d", reviewed="#475569",
    unknown_fill="#f3f4f6", unknown_fg="#4b5563", unknown_outline="#858d9b",
    tooltip_bg="#111827", tooltip_fg="#ffffff")

DARK = Theme(
    name="dark", window="#15181e", base="#1f232b", alt_base="#191c23", text="#e5e7eb",
    muted="#9aa3b2", faint="#7d8799", border="#363c48", border_hover="#5b6b8c",
    divider="#2a2f39", accent="#2563eb", accent_hover="#1d4ed8", accent_disabled="#2c4470",
    accent_text="#ffffff", link="#60a5fa", accent_soft="#1d3357",
    chip_bg="#232c45", chip_fg="#b4c0ff",
    key_bg="#e5e7eb", key_fg="#111827", thumb_bg="#2a2f38", track="#343a45",
    scroll_handle="#3d4452", scroll_handle_hover="#56607a", tile_border="#2e3440",
    tile_border_hover="#4b5466", error="#f87171", ok="#4ade80", reviewed="#94a3b8",
    unknown_fill="#2b313c", unknown_fg="#cbd5e1", unknown_outline="#7b8494",
    tooltip_bg="#e5e7eb", tooltip_fg="#111827")

_current = LIGHT


def theme() -> Theme:
    """The theme in use (the last one applied)."""
    return _current


STYLE_SHEET = Template("""
QMainWindow, #centralArea { background: $window; }
QToolBar#mainToolBar { background: $base; border: none; border-bottom: 1px solid $divider; }
QLabel#toolbarCaption { color: $muted; padding-left: 4px; }
QLabel#backendChip { background: $chip_bg; color: $chip_fg; border-radius: 10px;
    padding: 2px 10px; font-size: 8.5pt; }
QToolButton#labelButton { background: $accent; color: $accent_text; border-radius: 6px;
    padding: 5px 16px; font-weight: bold; }
QToolButton#labelButton:hover { background: $accent_hover; }
QToolButton#labelButton:disabled { background: $accent_disabled; }
QLabel#thresholdValue { color: $text; font-weight: bold; }
QComboBox { background: $base; color: $text; border: 1px solid $border; border-radius: 6px;
    padding: 3px 8px; min-height: 20px; }
QComboBox:hover { border-color: $border_hover; }
QComboBox::drop-down { border: none; width: 22px; }
QComboBox::down-arrow { image: url($arrow); width: 12px; height: 12px; }
QComboBox QAbstractItemView { background: $base; color: $text; border: 1px solid $border;
    selection-background-color: $accent_soft; selection-color: $text; outline: none; }
QScrollBar:vertical { background: transparent; width: 10px; margin: 0; }
QScrollBar::handle:vertical { background: $scroll_handle; border-radius: 3px;
    min-height: 32px; margin: 2px; }
QScrollBar::handle:vertical:hover { background: $scroll_handle_hover; }
QScrollBar:horizontal { background: transparent; height: 10px; margin: 0; }
QScrollBar::handle:horizontal { background: $scroll_handle; border-radius: 3px;
    min-width: 32px; margin: 2px; }
QScrollBar::handle:horizontal:hover { background: $scroll_handle_hover; }
QScrollBar::add-line, QScrollBar::sub-line { width: 0; height: 0; }
QScrollBar::add-page, QScrollBar::sub-page { background: transparent; }
QSlider::groove:horizontal { height: 4px; background: $track; border-radius: 2px; }
QSlider::sub-page:horizontal { background: $accent; border-radius: 2px; }
QSlider::handle:horizontal { background: $base; border: 2px solid $accent; width: 10px;
    height: 10px; margin: -6px 0; border-radius: 7px; }
QPushButton { background: $base; color: $text; border: 1px solid $border; border-radius: 6px;
    padding: 3px 12px; }
QPushButton:hover { border-color: $border_hover; }
QMenuBar { background: $base; color: $text; }
QMenuBar::item:selected { background: $accent_soft; }
QMenu { background: $base; color: $text; border: 1px solid $border; padding: 4px; }
QMenu::item { padding: 5px 22px 5px 18px; border-radius: 4px; }
QMenu::item:selected { background: $accent_soft; color: $text; }
QMenu::item:disabled { color: $faint; }
QMenu::separator { height: 1px; background: $divider; margin: 4px 8px; }
QToolTip { background: $tooltip_bg; color: $tooltip_fg; border: none; padding: 4px 6px; }
#classPanel, #detailPane { background: $window; }
QLabel#panelTitle { font-size: 11pt; font-weight: bold; color: $text; }
QLabel#hintLabel { color: $muted; }
QLabel#countsLabel { color: $muted; padding-left: 6px; }
QPushButton#addClassButton { background: $base; border: 1px solid $link; color: $link;
    border-radius: 6px; padding: 4px 12px; font-weight: bold; }
QPushButton#addClassButton:hover { background: $accent_soft; }
#cardsInner { background: transparent; }
QScrollArea { background: transparent; }
QFrame#classCard { background: $base; border: 1px solid $tile_border; border-radius: 8px; }
QFrame#classCard[dropTarget="true"] { background: $accent_soft; border: 2px dashed $accent; }
QLabel#keyHint { background: $key_bg; color: $key_fg; border-radius: 4px; font-size: 8pt;
    font-weight: bold; }
QLineEdit#className { font-weight: bold; font-size: 10pt; background: transparent;
    color: $text; }
QLineEdit#className:focus { background: $window; border-radius: 4px; }
QLabel#countLabel { color: $muted; font-size: 8pt; padding-left: 2px; }
QToolButton#moreButton { border: none; color: $muted; font-size: 12pt; padding: 0 4px; }
QToolButton#moreButton::menu-indicator { image: none; }
QListWidget#examplesView { background: $alt_base; border: 1px dashed $border;
    border-radius: 6px; }
QListView#gallery { background: $window; border: none; }
QLabel#detailName { color: $text; font-weight: bold; }
QLabel#detailVerdict { color: $text; }
QStatusBar { background: $base; color: $text; border-top: 1px solid $divider; }
QLabel#reviewCount { color: $text; padding-left: 8px; border-left: 1px solid $divider; }
QProgressBar { border: 1px solid $border; border-radius: 5px; background: $alt_base;
    height: 12px; text-align: center; font-size: 8pt; }
QProgressBar::chunk { background: $accent; border-radius: 4px; }
QSplitter::handle { background: $divider; }
QSplitter::handle:horizontal { width: 1px; }
""")


def arrow_icon(t: Theme) -> Path:
    """The combo boxes' chevron in the theme's muted colour: the bundled icon (light), else a
    copy recoloured into the user cache folder (a style sheet needs a file; the bundled
    icon, should the cache not be writable)."""
    bundled = paths.resources_dir() / "icons" / "chevron-down.svg"
    if not t.dark:
        return bundled
    target = paths.user_cache_dir() / "icons" / f"chevron-down-{t.muted.lstrip('#')}.svg"
    if target.is_file():
        return target
    try:
        svg = bundled.read_text(encoding="utf-8").replace(_ICON_STROKE, t.muted)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(svg, encoding="utf-8")
        tmp.replace(target)  # (atomic: another instance may be writing it too)
    except OSError:
        return bundled
    return target


def style_sheet(t: Theme) -> str:
    return STYLE_SHEET.substitute(asdict(t), arrow=arrow_icon(t).as_posix())


def palette(t: Theme) -> QPalette:
    R, G = QPalette.ColorRole, QPalette.ColorGroup
    pal = QPalette()
    for role, field in ((R.Window, "window"), (R.Base, "base"), (R.AlternateBase, "alt_base"),
                        (R.Text, "text"), (R.WindowText, "text"), (R.Button, "base"),
                        (R.ButtonText, "text"), (R.Highlight, "accent"),
                        (R.HighlightedText, "accent_text"), (R.ToolTipBase, "tooltip_bg"),
                        (R.ToolTipText, "tooltip_fg"), (R.PlaceholderText, "faint"),
                        (R.Link, "accent"), (R.Mid, "border"), (R.Midlight, "divider"),
                        (R.Light, "base"), (R.Dark, "border_hover"), (R.BrightText, "base")):
        pal.setColor(role, t.color(field))
    for role in (R.Text, R.WindowText, R.ButtonText):
        pal.setColor(G.Disabled, role, t.color("faint"))
    return pal


def scheme_from_env() -> Qt.ColorScheme | None:
    """``FEWSHOT_STUDIO_THEME=light|dark``: that scheme, whatever the system says."""
    value = os.environ.get(THEME_ENV, "").strip().lower()
    return {"light": Qt.ColorScheme.Light, "dark": Qt.ColorScheme.Dark}.get(value)


def theme_for(scheme: Qt.ColorScheme) -> Theme:
    return DARK if scheme == Qt.ColorScheme.Dark else LIGHT  # Unknown: light


def apply_style(app: QApplication, scheme: Qt.ColorScheme | None = None) -> Theme:
    """Apply the theme for ``scheme`` (default: the environment's override, else the
    system's colour scheme); returns it."""
    global _current
    if scheme is None:
        scheme = scheme_from_env() or app.styleHints().colorScheme()
    t = theme_for(scheme)
    app.setStyle("Fusion")
    f = QFont(app.font())
    if f.pointSizeF() < 9.5:
        f.setPointSizeF(9.5)
        app.setFont(f)
    changed = t != _current
    _current = t
    app.setPalette(palette(t))
    app.setStyleSheet(style_sheet(t))
    if changed:
        for w in app.allWidgets():  # custom-painted parts read theme() when they paint
            w.update()
    return t


def follow_system_scheme(app: QApplication) -> None:
    """Re-apply the theme whenever the system's colour scheme changes (unless the
    environment fixes it)."""
    def on_change(scheme: Qt.ColorScheme) -> None:
        if scheme_from_env() is None:
            apply_style(app, scheme)

    app.styleHints().colorSchemeChanged.connect(on_change)
