"""Lazy thumbnails: decoded off the UI thread, newest request first, kept in an LRU cache.

``ThumbnailCache.get(path)`` returns a ``QPixmap`` when it is cached and otherwise queues a
decode and returns None; ``ready(path)`` fires on the UI thread when it lands. Decoding uses
Pillow's JPEG draft mode (decode near the target size), applies EXIF orientation and handles
CMYK / 16-bit / palette images. Only what the views actually paint is requested, so a gallery
of 20,000 images decodes the few dozen tiles on screen. Requests are served LIFO, so fast
scrolling shows the current screen first; stale requests beyond ``max_pending`` are dropped.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from pathlib import Path

from PIL import Image, ImageOps
from PySide6.QtCore import QObject, QRunnable, QThreadPool, Signal
from PySide6.QtGui import QImage, QPixmap

from fewshot_studio.data.images import MAX_PIXELS, check_regular_file
from fewshot_studio.gui.workers import lower_thread_priority


def load_qimage(path: str | Path, size: int, box: tuple[int, int] | None = None) -> QImage:
    """Decode ``path`` to an RGB(A) ``QImage`` whose longest side is at most ``size``, or,
    with ``box=(w, h)``, cropped to fill exactly that box (centre crop, like CSS "cover"), so
    that painting it is a plain blit. Raises ImageLoadError (not a regular file, e.g. a FIFO
    that would block the decoder forever; empty; too large) before opening, OSError /
    ValueError (Pillow's errors) for unreadable files. Thread-safe."""
    check_regular_file(path)
    with Image.open(path) as im:
        if im.width * im.height > MAX_PIXELS:  # decompression-bomb guard (header only)
            raise ValueError(f"image too large ({im.width}x{im.height})")
        im.draft("RGB", (size, size) if box is None else (box[0] * 2, box[1] * 2))
        im = ImageOps.exif_transpose(im)
        has_alpha = im.mode in ("RGBA", "LA", "PA") or (
            im.mode == "P" and "transparency" in im.info)
        if im.mode == "I;16" or im.mode == "I":
            im = im.point(lambda v: v / 256).convert("L")
        im = im.convert("RGBA" if has_alpha else "RGB")
        if box is None:
            im.thumbnail((size, size), Image.Resampling.BILINEAR)
        else:
            im = ImageOps.fit(im, box, Image.Resampling.BILINEAR)
        fmt = QImage.Format.Format_RGBA8888 if has_alpha else QImage.Format.Format_RGB888
        bpl = im.width * (4 if has_alpha else 3)
        data = im.tobytes()
        return QImage(data, im.width, im.height, bpl, fmt).copy()  # own the buffer


class _Signals(QObject):
    loaded = Signal(str, QImage, str)  # path, image (null on error), error message


class _Drain(QRunnable):
    """Pops requests (newest first) until the queue is empty."""

    def __init__(self, owner: ThumbnailCache) -> None:
        super().__init__()
        self.owner = owner

    def run(self) -> None:
        lower_thread_priority()
        o = self.owner
        while True:
            with o._lock:
                if not o._queue:
                    o._drains -= 1
                    return
                key = o._queue.pop()
            try:
                img, err = load_qimage(key, o.size, o.box), ""
            except Exception as e:
                img, err = QImage(), f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            o._signals.loaded.emit(key, img, err)


class ThumbnailCache(QObject):
    """LRU cache of ``QPixmap`` thumbnails (longest side ``size``, or exactly ``box``) keyed
    by path string."""

    ready = Signal(str)

    def __init__(self, size: int = 192, capacity: int = 1500, threads: int = 2,
                 max_pending: int = 256, parent: QObject | None = None,
                 box: tuple[int, int] | None = None) -> None:
        super().__init__(parent)
        self.size, self.capacity, self.max_pending = size, capacity, max_pending
        self.box = box  # (w, h): decode straight to a centre-cropped tile of that size
        self._cache: OrderedDict[str, QPixmap] = OrderedDict()
        self._errors: dict[str, str] = {}
        self._pending: set[str] = set()
        self._queue: deque[str] = deque()
        self._lock = threading.Lock()
        self._drains = 0
        self._threads = threads
        self._pool = QThreadPool(self)
        self._pool.setMaxThreadCount(threads)
        self._signals = _Signals()
        self._signals.loaded.connect(self._on_loaded)
        self.decoded = 0  # number of decodes finished (tests, benchmarks)

    def get(self, path: str | Path) -> QPixmap | None:
        key = str(path)
        pm = self._cache.get(key)
        if pm is not None:
            self._cache.move_to_end(key)
            return pm
        if key not in self._errors:
            self.request(key)
        return None

    def error(self, path: str | Path) -> str | None:
        return self._errors.get(str(path))

    def request(self, key: str) -> None:
        with self._lock:
            if key in self._pending:
                try:  # re-request: move to the front of the LIFO queue
                    self._queue.remove(key)
                    self._queue.append(key)
                except ValueError:
                    pass  # already being decoded
                return
            self._pending.add(key)
            self._queue.append(key)
            while len(self._queue) > self.max_pending:
                self._pending.discard(self._queue.popleft())
            start = self._drains < self._threads
            if start:
                self._drains += 1
        if start:
            self._pool.start(_Drain(self))

    def _on_loaded(self, key: str, img: QImage, err: str) -> None:
        self._pending.discard(key)
        self.decoded += 1
        if err or img.isNull():
            self._errors[key] = err or "cannot decode"
        else:
            self._cache[key] = QPixmap.fromImage(img)
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        self.ready.emit(key)

    def clear(self) -> None:
        with self._lock:
            self._queue.clear()
            self._pending.clear()
        self._cache.clear()
        self._errors.clear()

    def wait_idle(self, msecs: int = 10_000) -> bool:
        """Block until all queued decodes finished (tests, shutdown)."""
        return self._pool.waitForDone(msecs)
