"""Menus, actions and keyboard shortcuts of the main window, and the small dialog flows they
start (open / save / export). Kept apart from the window's wiring."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from PySide6.QtCore import QUrl
from PySide6.QtGui import QAction, QDesktopServices, QGuiApplication, QKeySequence
from PySide6.QtWidgets import QFileDialog, QMenu, QMessageBox

from fewshot_studio import __version__
from fewshot_studio import paths as app_paths
from fewshot_studio.engine.export import EXPORT_FORMATS
from fewshot_studio.errors import UserError
from fewshot_studio.gui.project_io import PROJECT_SUFFIX
from fewshot_studio.gui.settings import last_dir, remember_dir

if TYPE_CHECKING:
    from fewshot_studio.gui.main_window import MainWindow

PROJECT_FILTER = f"FewShot Studio project (*{PROJECT_SUFFIX})"
SHORTCUTS = """<table cellpadding=3>
<tr><td><b>Ctrl+L</b></td><td>Label all images</td></tr>
<tr><td><b>Esc</b></td><td>Cancel labeling</td></tr>
<tr><td colspan=2><i>In the gallery (it has the keyboard from the start)</i></td></tr>
<tr><td><b>1 – 9</b></td><td>Correct the selected images to class 1–9, go to the next</td></tr>
<tr><td><b>Enter / Space</b></td><td>Accept the prediction (mark reviewed), go to the next
</td></tr>
<tr><td><b>N / Shift+N</b></td><td>Next / previous unreviewed image</td></tr>
<tr><td><b>Arrows, Home / End, PgUp / PgDn</b></td><td>Move the cursor (Shift: extend the
selection)</td></tr>
<tr><td><b>Ctrl+A</b></td><td>Select all shown images</td></tr>
<tr><td colspan=2><i>Everywhere</i></td></tr>
<tr><td><b>Ctrl+Z / Ctrl+Shift+Z</b></td><td>Undo / redo</td></tr>
<tr><td><b>Delete</b></td><td>Remove the selected examples from a class</td></tr>
<tr><td><b>Ctrl+V</b></td><td>Paste an image as an example of the current class</td></tr>
<tr><td><b>Ctrl+Shift+N</b></td><td>Add a class</td></tr>
<tr><td><b>Ctrl+Shift+O</b></td><td>Choose the query folder</td></tr>
<tr><td><b>Ctrl+E</b></td><td>Export CSV</td></tr>
<tr><td><b>Ctrl+N / Ctrl+O / Ctrl+S</b></td><td>New / open / save project</td></tr>
</table>"""


@dataclass
class Actions:
    new: QAction
    open: QAction
    save: QAction
    save_as: QAction
    demo: QAction
    query_folder: QAction
    import_classes: QAction
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
    tta: QAction
    int8: QAction
    accept: QAction
    next_unreviewed: QAction
    previous_unreviewed: QAction
    recent_menu: QMenu

    @property
    def export_csv(self) -> QAction:
        return self.exports["csv"]

    @property
    def export_json(self) -> QAction:
        return self.exports["json"]


def _act(win: MainWindow, text: str, slot, shortcut=None, tip: str = "") -> QAction:
    a = QAction(text, win)
    if shortcut is not None:
        a.setShortcut(QKeySequence(shortcut))
    if tip:
        a.setStatusTip(tip)
        a.setToolTip(tip)
    a.triggered.connect(lambda _=False: slot())
    win.addAction(a)
    return a


def build(win: MainWindow) -> Actions:
    K = QKeySequence.StandardKey
    undo = win.stack.createUndoAction(win, "&Undo")
    undo.setShortcut(QKeySequence(K.Undo))
    redo = win.stack.createRedoAction(win, "&Redo")
    redo.setShortcuts([QKeySequence("Ctrl+Shift+Z"), QKeySequence("Ctrl+Y")])
    a = Actions(
        new=_act(win, "&New project", lambda: new_project(win), K.New),
        open=_act(win, "&Open project…", lambda: open_project(win), K.Open),
        save=_act(win, "&Save project", lambda: save(win), K.Save),
        save_as=_act(win, "Save project &as…", lambda: save(win, ask=True), "Ctrl+Shift+S"),
        demo=_act(win, "Open the &demo project", lambda: open_demo(win)),
        query_folder=_act(win, "Choose &query folder…", lambda: choose_query_folder(win),
                          "Ctrl+Shift+O", "The folder of images to label"),
        import_classes=_act(win, "&Import class folders…", lambda: import_class_folders(win),
                            tip="A folder whose sub-folders are the classes: one class per "
                                "sub-folder, its images the examples"),
        open_checkpoint=_act(win, "Open &checkpoint…", lambda: open_checkpoint(win)),
        exports={f.name: _act(win, f"Export {f.title.split(' (')[0]}…",
                              lambda k=f.name: export(win, k),
                              "Ctrl+E" if f.name == "csv" else None, f.help)
                 for f in EXPORT_FORMATS.values()},
        export_copy=_act(win, "&Copy images into class folders…",
                         lambda: export(win, "copy")),
        undo=undo, redo=redo,
        add_class=_act(win, "Add &class", lambda: win.class_panel.add_class_and_edit(),
                       "Ctrl+Shift+N"),
        paste=_act(win, "&Paste image as example", lambda: paste(win), K.Paste),
        label=_act(win, "Label", win.label, "Ctrl+L", "Label every image (Ctrl+L)"),
        cancel=_act(win, "Cancel labeling", win.labeling.cancel, "Esc"),
        join_support=_act(win, "Corrected images &join the examples",
                          lambda: _toggle(win, "corrections_join_support")),
        transductive=_act(win, "&Transductive refinement",
                          lambda: _toggle(win, "transductive")),
        adaptive_unknown=_act(win, "&Adaptive unknown rule", lambda: _toggle_unknown_rule(win),
                              tip="Read which images are unknown off your class examples "
                                  "(each held out in turn) instead of the Unknown below "
                                  "threshold; with one example a class the threshold "
                                  "still applies"),
        tta=_act(win, "Test-time &augmentation", lambda: _toggle(win, "tta"),
                 tip="Average each image's features over slightly changed copies of it "
                     "(small warps for characters, the mirror image for photos): more "
                     "accurate, slower to embed; applies to the next labeling run"),
        int8=_act(win, "Faster CPU inference (&int8)", lambda: _toggle_int8(win),
                  tip="Run a quantised copy of the network on the CPU: 1.5-1.9x faster "
                      "labeling, predictions nearly always the same; applies to the next "
                      "labeling run"),
        # Review keys are the gallery's own (they act on its selection, and must not fire
        # while typing a class name): the text after the tab only shows the key in the menu.
        accept=_act(win, "&Accept prediction\tEnter", lambda: win.reviewing.accept_selected(),
                    tip="Mark the selected images reviewed and go to the next (Enter or "
                        "Space in the gallery)"),
        next_unreviewed=_act(win, "&Next unreviewed\tN",
                             lambda: win.reviewing.next_unreviewed(1)),
        previous_unreviewed=_act(win, "&Previous unreviewed\tShift+N",
                                 lambda: win.reviewing.next_unreviewed(-1)),
        recent_menu=QMenu("Open &recent", win),
    )
    a.cancel.setEnabled(False)
    for t in (a.join_support, a.transductive, a.adaptive_unknown, a.tta, a.int8):
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
    for x in (a.label, a.cancel):
        lm.addAction(x)
    lm.addSeparator()
    lm.addAction(a.join_support)
    lm.addAction(a.transductive)
    lm.addAction(a.adaptive_unknown)
    lm.addAction(a.tta)
    lm.addAction(a.int8)
    rm = mb.addMenu("&Review")
    for x in (a.accept, a.next_unreviewed, a.previous_unreviewed):
        rm.addAction(x)
    h = mb.addMenu("&Help")
    h.addAction(_act(win, "&Keyboard shortcuts", lambda: QMessageBox.information(
        win, "Keyboard shortcuts", SHORTCUTS)))
    h.addAction(_act(win, "Open &log folder", lambda: QDesktopServices.openUrl(
        QUrl.fromLocalFile(str(app_paths.user_log_dir())))))
    h.addAction(_act(win, "&About", lambda: QMessageBox.about(
        win, "About FewShot Studio",
        f"<b>FewShot Studio {__version__}</b><br>Label folders of images from a few "
        "examples per class.<br>Demo images: Caltech-101 (Fei-Fei, Fergus &amp; Perona "
        "2004), CC BY 4.0.")))
    return a


def _toggle(win: MainWindow, field: str) -> None:
    s = win.labeling.settings
    win.labeling.set_settings(replace(s, **{field: not getattr(s, field)}))
    win.project.mark_dirty()
    if field == "corrections_join_support":
        win.update_corrected_counts()


def _toggle_unknown_rule(win: MainWindow) -> None:
    s = win.labeling.settings
    rule = "threshold" if s.unknown_rule == "adaptive" else "adaptive"
    win.labeling.set_settings(replace(s, unknown_rule=rule))
    win.toolbar.set_adaptive_rule(rule == "adaptive")
    win.project.mark_dirty()


def _toggle_int8(win: MainWindow) -> None:
    s = win.labeling.settings
    win.labeling.set_settings(replace(s, precision="fp32" if s.precision == "int8" else "int8"))
    win.project.mark_dirty()


def _in_package(folder: Path) -> bool:
    """Inside the installed program (the bundled demo, checkpoints): no place for output."""
    roots = (app_paths.resources_dir(), app_paths.checkpoints_dir(),
             Path(__file__).resolve().parents[1])
    folder = folder.resolve()
    return any(folder == r.resolve() or r.resolve() in folder.parents for r in roots)


def _start_dir(win: MainWindow, kind: str = "project",
               order: tuple[str, ...] = ("last", "project", "query")) -> str:
    """Where a file dialog of ``kind`` opens: the first existing folder in ``order`` of
    "last" (the folder last chosen in a dialog of that kind, kept in QSettings), "project"
    (the project file's folder) and "query" (the query folder), else home; never a folder
    inside the program itself (the bundled demo's)."""
    folders = {"last": last_dir(kind), "query": win.labeling.query_folder,
               "project": win.project.path.parent if win.project.path is not None else None}
    for c in (folders[k] for k in order):
        if c is not None and c.is_dir() and not _in_package(c):
            return str(c)
    return os.path.expanduser("~")


def menu_text(action: QAction) -> str:
    """An action's text as the menu shows it ("Choose query folder…")."""
    return action.text().replace("&", "").split("\t")[0]


def setup_guidance(win: MainWindow, missing: list[str]) -> str:
    """The steps still to do before Label can run, naming the real menu entries (HTML)."""
    a = win.acts
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


def fill_recent(win: MainWindow) -> None:
    m = win.acts.recent_menu
    m.clear()
    items = win.project.recent.list()
    for p in items:
        act = m.addAction(p.name)
        act.setToolTip(str(p))
        act.triggered.connect(lambda _=False, p=p: open_project(win, p))
    if not items:
        m.addAction("(none)").setEnabled(False)


def new_project(win: MainWindow) -> None:
    if win.maybe_keep_changes():
        win.project.new()


def open_project(win: MainWindow, path: Path | None = None) -> None:
    if not win.maybe_keep_changes():
        return
    if path is None:
        f, _ = QFileDialog.getOpenFileName(win, "Open project", _start_dir(win), PROJECT_FILTER)
        if not f:
            return
        path = Path(f)
        remember_dir("project", path)
    try:
        rec = win.project.recoverable(path)
        win.project.open(path)
        if rec and QMessageBox.question(
                win, "Recover changes?", "This project has unsaved changes from an earlier "
                "session. Recover them?") == QMessageBox.StandardButton.Yes:
            win.project.recover(rec)
    except UserError as e:
        win.report("Cannot open the project", str(e))


def open_demo(win: MainWindow) -> None:
    if win.maybe_keep_changes():
        try:
            win.project.open_demo()
        except UserError as e:
            win.report("Cannot open the demo", str(e))


def save(win: MainWindow, ask: bool = False) -> bool:
    target = win.project.path
    if ask or target is None:
        f, _ = QFileDialog.getSaveFileName(win, "Save project", _start_dir(win), PROJECT_FILTER)
        if not f:
            return False
        target = Path(f)
        remember_dir("project", target)
    try:
        saved = win.project.save(target)
    except UserError as e:
        win.report("Cannot save", str(e))
        return False
    win.statusBar().showMessage(f"Saved {saved}", 5000)
    fill_recent(win)
    return True


def choose_query_folder(win: MainWindow) -> None:
    start = _start_dir(win, "query", ("query", "last", "project"))
    d = QFileDialog.getExistingDirectory(win, "Choose the folder of images to label", start)
    if d:
        remember_dir("query", Path(d))
        win.set_query_folder(Path(d))


def import_class_folders(win: MainWindow) -> None:
    """File > Import class folders…: one class per sub-folder of the chosen folder (the same
    code path as a folder dropped on the class panel)."""
    d = QFileDialog.getExistingDirectory(
        win, "Import class folders: choose the folder whose sub-folders are the classes",
        _start_dir(win, "classes"))
    if d:
        remember_dir("classes", Path(d))
        win.classes_ctl.import_class_folders([Path(d)])


def open_checkpoint(win: MainWindow) -> None:
    f, _ = QFileDialog.getOpenFileName(win, "Open checkpoint", _start_dir(win, "checkpoint"),
                                       "Checkpoints (*.safetensors)")
    if f:
        remember_dir("checkpoint", Path(f))
        win.set_checkpoint(f)
    else:
        win.toolbar.set_checkpoints(app_paths.bundled_checkpoints(), win.labeling.checkpoint)


def export(win: MainWindow, kind: str) -> None:
    preds = win.gallery_model.predictions()
    root = win.labeling.query_folder
    if not preds or root is None:
        win.report("Nothing to export", "Label the images first (Ctrl+L).")
        return
    start = _start_dir(win, f"export-{kind}", ("last", "query", "project"))
    if kind == "copy":
        d = QFileDialog.getExistingDirectory(win, "Copy images into class folders under…",
                                             start)
        if d:
            remember_dir("export-copy", Path(d))
            win.export.copy_to_folders(preds, Path(d))
        return
    fmt = EXPORT_FORMATS[kind]
    f, _ = QFileDialog.getSaveFileName(win, f"Export {fmt.title.split(' (')[0]}",
                                       str(Path(start) / f"labels{fmt.suffix}"), fmt.title)
    if f:
        remember_dir(f"export-{kind}", Path(f))
        win.export.export_file(kind, preds, Path(f), root, win.classes.names())


def paste(win: MainWindow) -> None:
    img = QGuiApplication.clipboard().image()
    if win.classes.rowCount() == 0:
        win.statusBar().showMessage("Add a class first, then paste", 4000)
    elif img.isNull():
        win.statusBar().showMessage("The clipboard holds no image", 4000)
    else:
        win.classes_ctl.paste_image(win.class_panel.current_row, img)
