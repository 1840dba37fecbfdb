"""Run Python's cyclic garbage collector on the GUI thread only.

Automatic collection runs in whichever thread happens to allocate; when that is a worker
thread (labeling, thumbnails) and the garbage holds Qt objects, their C++ destructors run off
the GUI thread and can crash the process (seen as a segfault during "Garbage-collecting" in a
QThreadPool worker). So automatic collection is switched off and a timer on the GUI thread
collects with the same generation thresholds instead."""

from __future__ import annotations

import gc

from PySide6.QtCore import QCoreApplication, QObject, QTimer

_installed: MainThreadGarbageCollector | None = None


class MainThreadGarbageCollector(QObject):
    """Collects on a GUI-thread timer whenever the allocation counters pass the thresholds
    that automatic collection would have used."""

    def __init__(self, parent: QObject | None = None, interval_ms: int = 250) -> None:
        super().__init__(parent)
        self.thresholds = gc.get_threshold()
        gc.disable()
        self._timer = QTimer(self)
        self._timer.timeout.connect(self.check)
        self._timer.start(interval_ms)

    def check(self) -> None:
        c0, c1, c2 = gc.get_count()
        t0, t1, t2 = self.thresholds
        if c0 > t0:
            gc.collect(2 if c2 > t2 else 1 if c1 > t1 else 0)


def install() -> MainThreadGarbageCollector:
    """Install the collector once per process, owned by the application object."""
    global _installed
    if _installed is None:
        _installed = MainThreadGarbageCollector(QCoreApplication.instance())
    return _installed
