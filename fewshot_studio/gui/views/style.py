"""The app's look: Fusion style, a light palette and one style sheet."""

from __future__ import annotations

from PySide6.QtGui import QColor, QFont, QPalette
from PySide6.QtWidgets import QApplication

from fewshot_studio import paths

STYLE_SHEET = """
QMainWindow, #centralArea { background: #f4f6f9; }
QToolBar#mainToolBar { background: #ffffff; border: none; border-bottom: 1px solid #e3e7ee;
    padding: 6px 10px; spacing: 8px; }
QLabel#toolbarCaption { color: #6b7280; padding-left: 4px; }
QLabel#backendChip { background: #eef2ff; color: #3730a3; border-radius: 10px;
    padding: 2px 10px; font-size: 8.5pt; }
QToolButton#labelButton { background: #2563eb; color: white; border-radius: 6px;
    padding: 5px 16px; font-weight: bold; }
QToolButton#labelButton:hover { background: #1d4ed8; }
QToolButton#labelButton:disabled { background: #93b4f5; }
QLabel#thresholdValue { color: #111827; font-weight: bold; }
QComboBox { background: white; border: 1px solid #d5dbe5; border-radius: 6px;
    padding: 3px 8px; min-height: 20px; }
QComboBox:hover { border-color: #9fb3d9; }
QComboBox::drop-down { border: none; width: 22px; }
QComboBox::down-arrow { image: url(@ICONS@/chevron-down.svg); width: 12px; height: 12px; }
QComboBox QAbstractItemView { background: white; border: 1px solid #d5dbe5;
    selection-background-color: #eaf1ff; selection-color: #111827; outline: none; }
QScrollBar:vertical { background: transparent; width: 10px; margin: 2px; }
QScrollBar::handle:vertical { background: #c9d0db; border-radius: 3px; min-height: 32px; }
QScrollBar::handle:vertical:hover { background: #a9b3c2; }
QScrollBar:horizontal { background: transparent; height: 10px; margin: 2px; }
QScrollBar::handle:horizontal { background: #c9d0db; border-radius: 3px; min-width: 32px; }
QScrollBar::add-line, QScrollBar::sub-line { width: 0; height: 0; }
QScrollBar::add-page, QScrollBar::sub-page { background: transparent; }
QSlider::groove:horizontal { height: 4px; background: #dbe2ec; border-radius: 2px; }
QSlider::sub-page:horizontal { background: #2563eb; border-radius: 2px; }
QSlider::handle:horizontal { background: white; border: 2px solid #2563eb; width: 10px;
    height: 10px; margin: -6px 0; border-radius: 7px; }
QPushButton { background: white; border: 1px solid #d5dbe5; border-radius: 6px;
    padding: 3px 12px; }
QPushButton:hover { border-color: #9fb3d9; }
QMenuBar { background: white; }
QMenu { background: white; border: 1px solid #d5dbe5; padding: 4px; }
QMenu::item { padding: 5px 22px 5px 18px; border-radius: 4px; }
QMenu::item:selected { background: #eaf1ff; color: #111827; }
#classPanel, #detailPane { background: #f4f6f9; }
QLabel#panelTitle { font-size: 11pt; font-weight: bold; color: #111827; }
QLabel#hintLabel { color: #6b7280; }
QLabel#countsLabel { color: #6b7280; padding-left: 6px; }
QPushButton#addClassButton { background: white; border: 1px solid #2563eb; color: #2563eb;
    border-radius: 6px; padding: 4px 12px; font-weight: bold; }
QPushButton#addClassButton:hover { background: #eff4ff; }
#cardsInner { background: transparent; }
QScrollArea { background: transparent; }
QFrame#classCard { background: white; border: 1px solid #e1e5ec; border-radius: 8px; }
QFrame#classCard[dropTarget="true"] { background: #eff4ff; border: 2px dashed #2563eb; }
QLabel#keyHint { background: #111827; color: white; border-radius: 4px; font-size: 8pt;
    font-weight: bold; }
QLineEdit#className { font-weight: bold; font-size: 10pt; background: transparent;
    color: #111827; }
QLineEdit#className:focus { background: #f4f6f9; border-radius: 4px; }
QLabel#countLabel { color: #6b7280; font-size: 8pt; padding-left: 2px; }
QToolButton#moreButton { border: none; color: #6b7280; font-size: 12pt; padding: 0 4px; }
QToolButton#moreButton::menu-indicator { image: none; }
QListWidget#examplesView { background: #f8f9fb; border: 1px dashed #d5dbe5;
    border-radius: 6px; }
QListView#gallery { background: #f4f6f9; border: none; }
QLabel#detailName { color: #374151; font-weight: bold; }
QLabel#detailVerdict { color: #111827; }
QStatusBar { background: white; border-top: 1px solid #e3e7ee; }
QProgressBar { border: 1px solid #d5dbe5; border-radius: 5px; background: #f1f3f7;
    height: 12px; text-align: center; font-size: 8pt; }
QProgressBar::chunk { background: #2563eb; border-radius: 4px; }
QSplitter::handle { background: #e3e7ee; }
QSplitter::handle:horizontal { width: 1px; }
"""


def apply_style(app: QApplication) -> None:
    app.setStyle("Fusion")
    pal = QPalette()
    pal.setColor(QPalette.ColorRole.Window, QColor("#f4f6f9"))
    pal.setColor(QPalette.ColorRole.Base, QColor("#ffffff"))
    pal.setColor(QPalette.ColorRole.AlternateBase, QColor("#f8f9fb"))
    pal.setColor(QPalette.ColorRole.Text, QColor("#111827"))
    pal.setColor(QPalette.ColorRole.WindowText, QColor("#111827"))
    pal.setColor(QPalette.ColorRole.Button, QColor("#ffffff"))
    pal.setColor(QPalette.ColorRole.ButtonText, QColor("#111827"))
    pal.setColor(QPalette.ColorRole.Highlight, QColor("#2563eb"))
    pal.setColor(QPalette.ColorRole.HighlightedText, QColor("#ffffff"))
    pal.setColor(QPalette.ColorRole.ToolTipBase, QColor("#111827"))
    pal.setColor(QPalette.ColorRole.ToolTipText, QColor("#ffffff"))
    app.setPalette(pal)
    f = QFont(app.font())
    if f.pointSizeF() < 9.5:
        f.setPointSizeF(9.5)
    app.setFont(f)
    icons = (paths.resources_dir() / "icons").as_posix()
    app.setStyleSheet(STYLE_SHEET.replace("@ICONS@", icons))
