"""Application entry point: ``fewshot-studio`` (optionally ``--demo``, ``PROJECT.fsproj`` or
``--open PROJECT``: the project opens with its saved labels shown, ``--demo --screenshot
out.png``)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from PySide6.QtCore import QTimer
from PySide6.QtGui import QIcon
from PySide6.QtWidgets import QApplication, QMessageBox

from fewshot_studio import __version__
from fewshot_studio import paths as app_paths
from fewshot_studio.errors import UserError
from fewshot_studio.gui import excepthook
from fewshot_studio.gui.main_window import MainWindow
from fewshot_studio.gui.views.style import apply_style, follow_system_scheme

log = logging.getLogger("fewshot_studio.gui")


def app_icon() -> QIcon:
    icon = QIcon()
    d = app_paths.resources_dir() / "icons"
    for p in sorted(d.glob("fewshot-studio-*.png")):
        icon.addFile(str(p))
    if (svg := d / "fewshot-studio.svg").is_file():
        icon.addFile(str(svg))
    return icon


def make_app(argv: list[str] | None = None) -> QApplication:
    app = QApplication.instance()
    if not isinstance(app, QApplication):
        app = QApplication(argv or [sys.argv[0]])
    app.setApplicationName("FewShot Studio")
    app.setOrganizationName("FewShotStudio")
    app.setApplicationVersion(__version__)
    app.setDesktopFileName("fewshot-studio")
    app.setWindowIcon(app_icon())
    apply_style(app)  # light or dark, as the system (or FEWSHOT_STUDIO_THEME) says
    if not app.property("followsColorScheme"):  # (tests call make_app more than once)
        follow_system_scheme(app)
        app.setProperty("followsColorScheme", True)
    # Worker threads run Python too (decoding, the engine's head); a short GIL switch
    # interval bounds how long the UI thread can wait for the GIL (default 5 ms per hand-off).
    sys.setswitchinterval(0.001)
    return app


class ScreenshotRun:
    """``--demo --screenshot``: label the demo, wait for ``run_finished``, show the review
    loop (least confident first, the first ``accept`` images accepted as with Enter), wait for
    the visible thumbnails, grab the window, exit. Exit code 0 on success, 2 when labeling
    could not run (the screenshot is still written, and the reason printed). The theme is the
    system's, or ``FEWSHOT_STUDIO_THEME=light|dark``."""

    accept = 3

    def __init__(self, win: MainWindow, out: Path, timeout_s: float = 300.0) -> None:
        self.win, self.out, self.code = win, out, 0
        lab = win.labeling
        win.show_error = self._on_error
        lab.scanned.connect(self._on_scanned)
        lab.run_finished.connect(self._on_finished)
        lab.run_cancelled.connect(lambda: self._finish(2))
        self.deadline = QTimer(win, singleShot=True, interval=int(timeout_s * 1000))
        self.deadline.timeout.connect(lambda: self._fail("timed out"))
        self.deadline.start()
        self._started = False
        self.done = False

    def _on_scanned(self, n: int) -> None:
        if not self._started:
            self._started = True
            QTimer.singleShot(100, self._label)

    def _label(self) -> None:
        if self.done:
            return
        if self.win.labeling.label() is None and not self.win.labeling.busy:
            self._fail("labeling did not start")

    def _on_finished(self, _summary: dict) -> None:
        # show the review: least confident first, the first tile selected in the detail pane
        w = self.win
        w.review.sort.setCurrentIndex(1)
        w.proxy.set_sort(True)
        if w.proxy.rowCount():
            w.gallery.setCurrentIndex(w.proxy.index(0, 0))
            w.gallery.setFocus()
            for _ in range(min(self.accept, w.proxy.rowCount() - 1)):
                w.reviewing.accept_selected()  # Enter: reviewed, the cursor moves on
        QTimer.singleShot(300, self._settle)

    def _settle(self, tries: int = 0) -> None:
        # wait (without blocking) until the thumbnails on screen are decoded
        if (self.win.thumbs._pending or self.win.detail.images._pending) and tries < 50:
            QTimer.singleShot(100, lambda: self._settle(tries + 1))
            return
        self._finish(self.code)

    def _on_error(self, title: str, message: str, details: str = "") -> None:
        print(f"error: {title}: {message}", file=sys.stderr)
        if details:
            log.error("%s", details)
        self.code = 2
        QTimer.singleShot(300, lambda: self._settle())

    def _fail(self, why: str) -> None:
        print(f"error: screenshot: {why}", file=sys.stderr)
        self._finish(2)

    def _finish(self, code: int) -> None:
        if self.done:
            return
        self.done = True
        self.deadline.stop()
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.win.gallery.itemDelegate().budget_s = float("inf")  # every tile in full
        ok = self.win.grab().save(str(self.out))
        if not ok:
            print(f"error: cannot write {self.out}", file=sys.stderr)
            code = 2
        else:
            print(f"screenshot saved to {self.out}")
        self.win.project.stack.setClean()
        self.win.project._dirty_extra = False
        self.win.close()
        QApplication.instance().exit(code)


def run_app(args: argparse.Namespace) -> int:
    """Start the GUI; returns the exit code."""
    excepthook.setup_logging()
    app = make_app()
    previous_hook = excepthook.install()
    screenshot = getattr(args, "screenshot", None)
    if screenshot and not getattr(args, "demo", False):
        print("error: --screenshot needs --demo", file=sys.stderr)
        return 2
    win = MainWindow(restore_state=not screenshot)
    if screenshot:
        win.resize(1360, 820)
    runner = ScreenshotRun(win, Path(screenshot)) if screenshot else None
    try:
        if getattr(args, "demo", False):
            win.project.open_demo()
            if not win.labeling.checkpoint:
                win.report("No checkpoint", "No bundled checkpoint was found in "
                           f"{app_paths.checkpoints_dir()}. Use “Open checkpoint…” in the "
                           "toolbar to pick a .safetensors file.")
        elif getattr(args, "project", None):
            win.project.open(Path(args.project))
        elif (rec := win.project.recoverable(None)) is not None and QMessageBox.question(
                win, "Recover unsaved work?", "FewShot Studio closed with unsaved changes "
                "to an untitled project. Recover them?") == QMessageBox.StandardButton.Yes:
            win.project.recover(rec)
    except UserError as e:
        win.report("Cannot open", str(e))
        if runner:
            return 2
    win.show()
    if runner:  # ScreenshotRun exits the loop itself; no quit-on-last-window-closed
        app.setQuitOnLastWindowClosed(False)
    code = app.exec()
    app.setQuitOnLastWindowClosed(True)
    sys.excepthook = previous_hook
    del runner
    return int(code)
