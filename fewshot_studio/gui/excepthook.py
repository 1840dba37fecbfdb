"""A global exception hook: any uncaught exception (in a slot, a paint event...) is logged
with its traceback to the user log directory and shown in a dialog; the app keeps running."""

from __future__ import annotations

import logging
import sys
import traceback
from collections.abc import Callable
from logging.handlers import RotatingFileHandler
from pathlib import Path
from types import TracebackType

from fewshot_studio import paths
from fewshot_studio.errors import UserError

log = logging.getLogger("fewshot_studio.gui")
_ExcHook = Callable[[type[BaseException], BaseException, TracebackType | None], None]


def log_file() -> Path:
    return paths.user_log_dir() / "fewshot-studio.log"


def setup_logging() -> Path | None:
    """Log to a rotating file in the user log dir (None if it cannot be created)."""
    try:
        path = log_file()
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = RotatingFileHandler(path, maxBytes=1_000_000, backupCount=3, encoding="utf-8")
    except OSError:
        return None
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("fewshot_studio")
    if not any(isinstance(h, RotatingFileHandler) for h in root.handlers):
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    return path


def show_error_dialog(title: str, message: str, details: str = "") -> None:
    """A modal error box (no-op without a QApplication, e.g. in the CLI)."""
    from PySide6.QtWidgets import QApplication, QMessageBox

    if QApplication.instance() is None:
        return
    box = QMessageBox(QMessageBox.Icon.Critical, title, message)
    if details:
        box.setDetailedText(details)
        box.setInformativeText(f"The details were written to {log_file()}")
    box.exec()


def install(show: Callable[[str, str, str], None] = show_error_dialog) -> _ExcHook:
    """Install the hook; returns the previous ``sys.excepthook``. ``show(title, message,
    details)`` presents it (a dialog by default; tests pass a recorder)."""
    previous = sys.excepthook

    def hook(etype: type[BaseException], value: BaseException,
             tb: TracebackType | None) -> None:
        if issubclass(etype, KeyboardInterrupt):
            previous(etype, value, tb)
            return
        details = "".join(traceback.format_exception(etype, value, tb))
        if isinstance(value, UserError):
            log.warning("%s", value)
            show("FewShot Studio", str(value), "")
            return
        log.error("uncaught exception\n%s", details)
        try:
            show("Unexpected error", f"{etype.__name__}: {value}", details)
        except Exception:
            sys.__excepthook__(etype, value, tb)

    sys.excepthook = hook
    return previous
