"""File > Export: a label file in any format of ``engine.export.EXPORT_FORMATS`` (the CLI's
writers: CSV, JSON, Label Studio, FiftyOne), or copies of the images in one folder per class.
Always in a worker; progress goes to the status bar."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from PySide6.QtCore import QObject, Signal

from fewshot_studio.engine.api import Prediction
from fewshot_studio.gui.workers import GeneratorWorker, bind_to
from fewshot_studio.progress import Progress


def _write_job(kind: str, preds: Sequence[Prediction], out: Path, root: Path,
               classes: Sequence[str]) -> Iterator[Progress]:
    from fewshot_studio.engine import export

    yield Progress(0, len(preds), f"Writing {out.name}…")
    return export.EXPORT_FORMATS[kind].write(preds, out, root, classes=classes)


def _copy_job(preds: Sequence[Prediction], dest: Path) -> Iterator[Progress]:
    """Copies into class folders; returns the status-bar message (failures counted)."""
    from fewshot_studio.engine import export

    metrics: dict[str, float] = {}
    for p in export.copy_to_class_folders(preds, dest, move=False):
        metrics = p.metrics
        yield p
    failed = int(metrics.get("failed", 0))
    return (f"Copied {int(metrics.get('copied', 0))} images into class folders in {dest}"
            + (f"; {failed} failed (disk full or not writable?)" if failed else ""))


class ExportController(QObject):
    progress = Signal(int, int, str)
    finished = Signal(str)  # a status-bar message
    failed = Signal(str, str, str)

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.worker: GeneratorWorker | None = None

    def export_file(self, kind: str, preds: Sequence[Prediction], out: Path, root: Path,
                    classes: Sequence[str] = (), note: str = "") -> GeneratorWorker:
        """Write ``preds`` in the format ``kind`` (a key of ``EXPORT_FORMATS``) to ``out``,
        paths relative to ``root``; ``classes``: the class names, in order; ``note``: added
        to the message at the end."""
        w = GeneratorWorker(_write_job, kind, list(preds), Path(out), Path(root),
                            list(classes))
        w.signals.finished.connect(bind_to(
            self, lambda p: self.finished.emit(f"Exported {len(preds)} rows to {p}{note}")))
        return self._start(w)

    def copy_to_folders(self, preds: Sequence[Prediction], dest: Path,
                        note: str = "") -> GeneratorWorker:
        w = GeneratorWorker(_copy_job, list(preds), Path(dest))
        w.signals.finished.connect(bind_to(self, lambda m: self.finished.emit(m + note)))
        return self._start(w)

    def _start(self, w: GeneratorWorker) -> GeneratorWorker:
        last = [0.0]

        def on_item(p: Progress) -> None:  # at most ~10 updates a second
            now = time.perf_counter()
            if now - last[0] >= 0.1 or p.done == p.total:
                last[0] = now
                self.progress.emit(p.done, p.total or 0, p.message)

        w.signals.yielded.connect(on_item)
        w.signals.errored.connect(bind_to(
            self, lambda e: self.failed.emit("Export failed", str(e), "")))
        self.worker = w
        return w.start()
