"""Menus, actions and keyboard shortcuts of the main window. What they do is the
:class:`~fewshot_studio.gui.controllers.commands.Commands`' (and the review and class
controllers'); this module only builds the ``QAction`` objects and the menu bar."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from html import escape
from pathlib import Path

from PySide6.QtCore import Qt, QUrl
from PySide6.QtGui import QAction, QDesktopServices, QKeySequence, QUndoStack
from PySide6.QtWidgets import (
    QDialog,
    QDialogButtonBox,
    QMainWindow,
    QMenu,
    QMessageBox,
    QTextBrowser,
    QVBoxLayout,
)

from fewshot_studio import __version__
from fewshot_studio import paths as app_paths
from fewshot_studio.engine.export import EXPORT_FORMATS
from fewshot_studio.gui.controllers.commands import Commands
from fewshot_studio.gui.controllers.review import ReviewController

SHORTCUTS = """<tr><td colspan=2><i>In the gallery (it has the keyboard from the start)</i></td>
</tr>
<tr><td><b>1 – 9</b></td><td>Correct the selected images to class 1–9, go to the next</td></tr>
<tr><td><b>Enter / Space</b></td><td>Accept the prediction (mark reviewed), go to the next
</td></tr>
<tr><td><b>N / Shift+N</b></td><td>Next / previous unreviewed image</td></tr>
<tr><td><b>Arrows, Home / End, PgUp / PgDn</b></td><td>Move the cursor (Shift: extend the
selection)</td></tr>
<tr><td><b>Ctrl+A</b></td><td>Select all shown images</td></tr>
<tr><td colspan=2><i>In a class card</i></td></tr>
<tr><td><b>Delete / Backspace</b></td><td>Remove the selected examples from the class</td></tr>
"""
"""The keys no menu action carries (the gallery's and the class cards' own): the fixed part
of Help > Keyboard shortcuts. The rest is read off the window's actions when the dialog
opens (:func:`shortcut_rows`), so a new action with a shortcut is listed by itself."""


FINETUNE_TIP = ("Fine-tune a copy of the model's last layers on your class examples before "
                "labeling (seconds on the CPU; the checkpoint file is not changed): often "
                "more accurate on images unlike the model's training data")
"""Label > Fine-tune on my examples, when the checkpoint can be fine-tuned (else the tip
says why not)."""


@dataclass
class Actions:
    new: QAction
    open: QAction
    save: QAction
    save_as: QAction
    demo: QAction
    query_folder: QAction
    import_classes: QAction
    import_labels_csv: QAction
    import_labels_folders: QAction
    open_checkpoint: QAction
    exports: dict[str, QAction]  # one per label file format (engine.export.EXPORT_FORMATS)
    export_copy: QAction
    undo: QAction
    redo: QAction
    add_class: QAction
    paste: QAction
    label: QAction
    cancel: QAction
    join_support: QAction
    transductive: QAction
    adaptive_unknown: QAction
    finetune: QAction
    tta: QAction
    int8: QAction
    accept: QAction
    next_unreviewed: QAction
    previous_unreviewed: QAction
    find_duplicates: QAction
    keep_one: QAction
    recent_menu: QMenu

    @property
    def export_csv(self) -> QAction:
        return self.exports["csv"]

    @property
    def export_json(self) -> QAction:
        return self.exports["json"]


def _act(win: QMainWindow, text: str, slot: Callable[[], object],
         shortcut: QKeySequence.StandardKey | str | None = None, tip: str = "") -> QAction:
    a = QAction(text, win)
    if shortcut is not None:
        a.setShortcut(QKeySequence(shortcut))
    if tip:
        a.setStatusTip(tip)
        a.setToolTip(tip)
    a.triggered.connect(lambda _=False: slot())
    win.addAction(a)
    return a


def build(win: QMainWindow, cmd: Commands, stack: QUndoStack, review: ReviewController,
          label: Callable[[], object], cancel: Callable[[], object],
          add_class: Callable[[], object]) -> Actions:
    """The actions, wired to ``cmd`` (files, settings), ``review`` (the Review menu) and the
    ``label`` / ``cancel`` / ``add_class`` slots, in the menu bar of ``win``."""
    K = QKeySequence.StandardKey
    undo = stack.createUndoAction(win, "&Undo")
    undo.setShortcut(QKeySequence(K.Undo))
    redo = stack.createRedoAction(win, "&Redo")
    redo.setShortcuts([QKeySequence("Ctrl+Shift+Z"), QKeySequence("Ctrl+Y")])
    a = Actions(
        new=_act(win, "&New project", cmd.new_project, K.New),
        open=_act(win, "&Open project…", lambda: cmd.open_project(), K.Open),
        save=_act(win, "&Save project", lambda: cmd.save(), K.Save),
        save_as=_act(win, "Save project &as…", lambda: cmd.save(ask=True), "Ctrl+Shift+S"),
        demo=_act(win, "Open the &demo project", cmd.open_demo),
        query_folder=_act(win, "Choose &query folder…", cmd.choose_query_folder,
                          "Ctrl+Shift+O", "The folder of images to label"),
        import_classes=_act(win, "&Import class folders…", cmd.import_class_folders,
                            tip="A folder whose sub-folders are the classes: one class per "
                                "sub-folder, its images the examples"),
        import_labels_csv=_act(win, "From a &CSV file…", lambda: cmd.import_labels("csv"),
                               "Ctrl+I", tip="A path,label CSV (the app's or the CLI's own export "
                                   "works): images in the query folder become corrections, "
                                   "others examples of their class"),
        import_labels_folders=_act(win, "From class &folders…",
                                   lambda: cmd.import_labels("folders"), "Ctrl+Shift+I",
                                   tip="A folder whose sub-folders are the classes: images in "
                                       "the query folder become corrections, others examples"),
        open_checkpoint=_act(win, "Open &checkpoint…", cmd.open_checkpoint),
        exports={f.name: _act(win, f"Export {f.title.split(' (')[0]}…",
                              lambda k=f.name: cmd.export(k),
                              "Ctrl+E" if f.name == "csv" else None, f.help)
                 for f in EXPORT_FORMATS.values()},
        export_copy=_act(win, "&Copy images into class folders…",
                         lambda: cmd.export("copy")),
        undo=undo, redo=redo,
        add_class=_act(win, "Add &class", add_class,
                       "Ctrl+Shift+N"),
        paste=_act(win, "&Paste image as example", cmd.paste, K.Paste),
        label=_act(win, "Label", label, "Ctrl+L", "Label every image (Ctrl+L)"),
        cancel=_act(win, "Cancel labeling", cancel, "Esc"),
        join_support=_act(win, "Corrected images &join the examples",
                          lambda: cmd.toggle("corrections_join_support")),
        transductive=_act(win, "&Transductive refinement",
                          lambda: cmd.toggle("transductive")),
        adaptive_unknown=_act(win, "&Adaptive unknown rule", cmd.toggle_unknown_rule,
                              tip="Read which images are unknown off your class examples "
                                  "(each held out in turn) instead of the Unknown below "
                                  "threshold; with one example a class the threshold "
                                  "still applies"),
        finetune=_act(win, "&Fine-tune on my examples", cmd.toggle_finetune,
                      tip=FINETUNE_TIP),
        tta=_act(win, "Test-time &augmentation", lambda: cmd.toggle("tta"),
                 tip="Average each image's features over slightly changed copies of it "
                     "(small warps for characters, the mirror image for photos): more "
                     "accurate, slower to embed; applies to the next labeling run"),
        int8=_act(win, "Faster CPU inference (&int8)", cmd.toggle_int8,
                  tip="Run a quantised copy of the network on the CPU: 1.5-1.9x faster "
                      "labeling, predictions nearly always the same; applies to the next "
                      "labeling run"),
        # Review keys are the gallery's own (they act on its selection, and must not fire
        # while typing a class name): the text after the tab only shows the key in the menu.
        accept=_act(win, "&Accept prediction\tEnter", review.accept_selected,
                    tip="Mark the selected images reviewed and go to the next (Enter or "
                        "Space in the gallery)"),
        next_unreviewed=_act(win, "&Next unreviewed\tN",
                             lambda: review.next_unreviewed(1)),
        previous_unreviewed=_act(win, "&Previous unreviewed\tShift+N",
                                 lambda: review.next_unreviewed(-1)),
        find_duplicates=_act(win, "Find &duplicates", cmd.find_duplicates, "Ctrl+D",
                             tip="Look for near-duplicate images among those to label "
                                 "(the same file, or resized / re-encoded copies) and show "
                                 "each group together"),
        keep_one=_act(win, "&Keep one, mark the rest", cmd.keep_one_mark_rest, "Ctrl+Shift+D",
                      tip="In each duplicate group keep one image (the selected one, else "
                          "one you reviewed, else the largest file) and mark the others as "
                          "its duplicates: exports leave them out; no file is touched"),
        recent_menu=QMenu("Open &recent", win),
    )
    a.cancel.setEnabled(False)
    for t in (a.join_support, a.transductive, a.adaptive_unknown, a.finetune, a.tta,
              a.int8):
        t.setCheckable(True)
    mb = win.menuBar()
    f = mb.addMenu("&File")
    for x in (a.new, a.open):
        f.addAction(x)
    f.addMenu(a.recent_menu)
    f.addAction(a.demo)
    f.addSeparator()
    for x in (a.save, a.save_as):
        f.addAction(x)
    f.addSeparator()
    f.addAction(a.query_folder)
    f.addAction(a.import_classes)
    labels = f.addMenu("Import &labels")
    labels.addAction(a.import_labels_csv)
    labels.addAction(a.import_labels_folders)
    f.addAction(a.open_checkpoint)
    f.addSeparator()
    ex = f.addMenu("E&xport")
    for x in (*a.exports.values(), a.export_copy):
        ex.addAction(x)
    f.addSeparator()
    f.addAction(_act(win, "&Quit", win.close, K.Quit))
    e = mb.addMenu("&Edit")
    for x in (a.undo, a.redo):
        e.addAction(x)
        win.addAction(x)
    e.addSeparator()
    e.addAction(a.add_class)
    e.addAction(a.paste)
    lm = mb.addMenu("&Label")
    lm.setToolTipsVisible(True)  # a disabled toggle's tip says why
    for x in (a.label, a.cancel):
        lm.addAction(x)
    lm.addSeparator()
    lm.addAction(a.join_support)
    lm.addAction(a.transductive)
    lm.addAction(a.adaptive_unknown)
    lm.addAction(a.finetune)
    lm.addAction(a.tta)
    lm.addAction(a.int8)
    rm = mb.addMenu("&Review")
    for x in (a.accept, a.next_unreviewed, a.previous_unreviewed):
        rm.addAction(x)
    rm.addSeparator()
    rm.addAction(a.find_duplicates)
    rm.addAction(a.keep_one)
    h = mb.addMenu("&Help")
    h.addAction(_act(win, "&Keyboard shortcuts", lambda: show_shortcuts(win)))
    h.addAction(_act(win, "Open &log folder", lambda: QDesktopServices.openUrl(
        QUrl.fromLocalFile(str(app_paths.user_log_dir())))))
    h.addAction(_act(win, "&About", lambda: QMessageBox.about(
        win, "About FewShot Studio",
        f"<b>FewShot Studio {__version__}</b><br>Label folders of images from a few "
        "examples per class.<br>Demo images: Caltech-101 (Fei-Fei, Fergus &amp; Perona "
        "2004), CC BY 4.0.")))
    return a


def menu_text(action: QAction) -> str:
    """An action's text as the menu shows it ("Choose query folder…")."""
    return action.text().replace("&", "").split("\t")[0]


def key_text(action: QAction) -> str:
    """An action's shortcuts as the menu shows them ("Ctrl+Shift+Z / Ctrl+Y"); "" if none."""
    return " / ".join(k.toString(QKeySequence.SequenceFormat.NativeText)
                      for k in action.shortcuts() if not k.isEmpty())


def shortcut_rows(win: QMainWindow) -> list[tuple[str, str]]:
    """``(keys, where)`` for every action of ``win`` with a shortcut: those in the menu bar
    in menu order, ``where`` its menu path ("File > Import labels > From a CSV file…"),
    then any other (``where``: its text). Read when asked, so actions added after
    :func:`build` (the embedding map's) are there."""
    rows: list[tuple[str, str]] = []
    seen: set[QAction] = set()

    def walk(menu: QMenu, path: str) -> None:
        for a in menu.actions():
            if a.menu() is not None:
                walk(a.menu(), f"{path} > {menu_text(a)}")
            elif a not in seen and not a.isSeparator():
                seen.add(a)
                if keys := key_text(a):
                    rows.append((keys, f"{path} > {menu_text(a)}"))

    for top in win.menuBar().actions():
        if top.menu() is not None:
            walk(top.menu(), menu_text(top))
    for a in win.findChildren(QAction):
        if a not in seen and (keys := key_text(a)):
            seen.add(a)
            rows.append((keys, menu_text(a)))
    return rows


def shortcuts_html(win: QMainWindow) -> str:
    """Help > Keyboard shortcuts: the actions' keys (:func:`shortcut_rows`), then
    :data:`SHORTCUTS`."""
    rows = "".join(f"<tr><td><b>{escape(k)}</b></td><td>{escape(where)}</td></tr>\n"
                   for k, where in shortcut_rows(win))
    return (f"<table cellpadding=3><tr><td colspan=2><i>Menu commands (everywhere)</i></td>"
            f"</tr>\n{rows}{SHORTCUTS}</table>")


def show_shortcuts(win: QMainWindow) -> QDialog:
    """The Help > Keyboard shortcuts dialog (modeless, scrolls if the screen is small)."""
    dlg = QDialog(win)
    dlg.setWindowTitle("Keyboard shortcuts")
    text = QTextBrowser(dlg)
    text.setHtml(shortcuts_html(win))
    buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close, dlg)
    buttons.rejected.connect(dlg.close)
    layout = QVBoxLayout(dlg)
    layout.addWidget(text)
    layout.addWidget(buttons)
    dlg.resize(620, 640)
    dlg.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
    dlg.show()
    return dlg


def setup_guidance(a: Actions, missing: list[str]) -> str:
    """The steps still to do before Label can run, naming the real menu entries (HTML)."""
    steps = {
        "classes": ("Add at least two classes, each with example images: "
                    f"<b>+ Class</b> (Edit > {menu_text(a.add_class)}, Ctrl+Shift+N), then "
                    "drop images on its card; or <b>File > "
                    f"{menu_text(a.import_classes)}</b> for a folder of class folders."),
        "images": (f"Choose the images to label: <b>File > {menu_text(a.query_folder)}</b> "
                   "(Ctrl+Shift+O), or drop their folder on the gallery."),
        "model": ("Pick a model in the toolbar's <b>Model</b> box (or "
                  f"<b>File > {menu_text(a.open_checkpoint)}</b>)."),
    }
    items = "".join(f"<li>{steps[m]}</li>" for m in missing if m in steps)
    return (f"Before labeling:<ol>{items}</ol>Then press <b>Label</b> (Ctrl+L). "
            f"Or try <b>File > {menu_text(a.demo)}</b>.")


def fill_recent(menu: QMenu, items: list[Path], open_project: Callable[[Path], None]) -> None:
    """File > Open recent: one entry per project file (most recent first)."""
    menu.clear()
    for p in items:
        act = menu.addAction(p.name)
        act.setToolTip(str(p))
        act.triggered.connect(lambda _=False, p=p: open_project(p))
    if not items:
        menu.addAction("(none)").setEnabled(False)
