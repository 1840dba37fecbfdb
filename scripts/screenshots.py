"""Regenerate the GUI screenshots of docs/gui.md from the bundled demo, headless:

    QT_QPA_PLATFORM=offscreen .venv/bin/python scripts/screenshots.py [--out docs]

It copies the demo project (resources/demo) to a temporary folder and adds a few near-duplicate
photos (a resized, re-encoded copy of three photos and a byte-for-byte copy of one), opens it
in the app with its user folders (cache, settings) in that temporary folder too, labels it
with the bundled checkpoint, and grabs the window twice:

* ``embedding-map.png``: View > Embedding map (PCA, or UMAP where ``umap-learn`` is
  installed), with a hovered point's thumbnail;
* ``duplicates.png``: Review > Find duplicates (the Duplicates filter shows each group
  together), then Review > Keep one, mark the rest.

``docs/screenshot.png`` is ``fewshot-studio --demo --screenshot`` (gui/app.py). Images are
written as PNG, reduced to 256 colours when larger than ``--max-kb``. The theme is the
system's, or ``FEWSHOT_STUDIO_THEME=light|dark`` (default here: light).
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZE = (1360, 820)  # the window, as `--demo --screenshot`
MAP_HEIGHT, MAP_DOCK = 960, 400  # the window's height with the map, the map dock's
DUPLICATES = ("airplanes_0093.jpg", "motorbikes_0078.jpg", "watch_0017.jpg")  # resized copies
EXACT_COPY = "sunflower_0012.jpg"  # and one byte-for-byte copy


def copy_demo(dest: Path) -> Path:
    """The demo project under ``dest`` with near-duplicates added to its photos; returns its
    project file."""
    from PIL import Image

    shutil.copytree(ROOT / "resources" / "demo", dest)
    photos = dest / "photos"
    for name in DUPLICATES:
        src = photos / name
        with Image.open(src) as im:
            small = im.convert("RGB").resize((im.width * 3 // 4, im.height * 3 // 4))
            small.save(photos / f"{src.stem}_small.jpg", quality=80)
    exact = photos / EXACT_COPY
    shutil.copyfile(exact, photos / f"{exact.stem}_copy.jpg")
    return dest / "demo.fsproj"


def wait_until(cond: Callable[[], bool], what: str, timeout_s: float = 300.0) -> None:
    """Run the event loop until ``cond()`` (TimeoutError naming ``what`` after ``timeout_s``)."""
    from PySide6.QtCore import QEventLoop
    from PySide6.QtWidgets import QApplication

    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        QApplication.processEvents(QEventLoop.ProcessEventsFlag.AllEvents, 50)
        time.sleep(0.01)


def settle(win, ms: int = 400) -> None:
    """Let queued signals land and the visible thumbnails decode, then repaint."""
    end = time.monotonic() + ms / 1000
    wait_until(lambda: time.monotonic() > end, "a pause")
    wait_until(lambda: not win.thumbs._pending and not win.detail.images._pending,
               "the thumbnails", 60)


def save_png(win, out: Path, max_kb: int) -> int:
    """Grab ``win`` into ``out`` (PNG, 256 colours if larger than ``max_kb``); its size."""
    from PIL import Image
    from PySide6.QtCore import QBuffer, QIODevice

    win.gallery.itemDelegate().budget_s = float("inf")  # every tile drawn in full
    buf = QBuffer()
    buf.open(QIODevice.OpenModeFlag.WriteOnly)
    win.grab().save(buf, "PNG")
    data = bytes(buf.data())
    if len(data) > max_kb * 1024:
        small = io.BytesIO()
        Image.open(io.BytesIO(data)).convert("RGB").quantize(
            256, method=Image.Quantize.MEDIANCUT).save(small, "PNG", optimize=True)
        data = small.getvalue()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    print(f"{out}: {len(data) // 1024} KB")
    return len(data)


def shoot_map(win, out: Path, max_kb: int) -> None:
    from PySide6.QtCore import Qt

    ctl = win.embedding_map
    with_map = [False]
    ctl.map_ready.connect(lambda _m: with_map.__setitem__(0, True))
    win.resize(SIZE[0], MAP_HEIGHT)
    ctl.dock.toggleViewAction().trigger()
    wait_until(lambda: with_map[0] and all(w.is_done for w in ctl.workers), "the map", 600)
    win.resizeDocks([ctl.dock], [MAP_DOCK], Qt.Orientation.Vertical)
    settle(win)
    # hover the image nearest the middle of the map: its thumbnail shows beside it
    pts = ctl.canvas.points
    centre = (pts.xy.min(axis=0) + pts.xy.max(axis=0)) / 2
    dist = ((pts.xy - centre) ** 2).sum(axis=1) + 1e12 * pts.support
    i = int(dist.argmin())
    ctl.canvas.hover_index = i
    ctl.canvas.hovered.emit(i)
    wait_until(lambda: ctl.canvas._thumb is not None, "the hover thumbnail", 60)
    ctl.canvas.update()
    settle(win)
    save_png(win, out, max_kb)
    ctl.dock.hide()
    win.resize(*SIZE)


def shoot_duplicates(win, out: Path, max_kb: int) -> None:
    dup = win.duplicates
    found: list[int] = []
    dup.found.connect(found.append)
    win.acts.find_duplicates.trigger()
    wait_until(lambda: bool(found), "the duplicate search", 300)
    if not found[0]:
        raise RuntimeError("no duplicate groups found in the demo copy")
    settle(win)
    win.gallery.setCurrentIndex(win.proxy.index(0, 0))
    win.acts.keep_one.trigger()  # one kept per group, the others marked
    settle(win)
    win.gallery.setCurrentIndex(win.proxy.index(1, 0))  # Details shows a marked copy
    settle(win)
    save_png(win, out, max_kb)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs", help="folder for the PNGs")
    ap.add_argument("--max-kb", type=int, default=280, help="reduce colours above this size")
    args = ap.parse_args(argv)
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    os.environ.setdefault("FEWSHOT_STUDIO_THEME", "light")
    with tempfile.TemporaryDirectory(prefix="fewshot-shots-") as tmp:
        for var in ("XDG_CACHE_HOME", "XDG_DATA_HOME", "XDG_CONFIG_HOME", "XDG_STATE_HOME"):
            os.environ[var] = str(Path(tmp) / "user" / var.lower())
        project = copy_demo(Path(tmp) / "demo")
        from fewshot_studio.gui.app import make_app
        from fewshot_studio.gui.main_window import MainWindow

        app = make_app()
        win = MainWindow(restore_state=False)
        win.show_error = lambda *a: print("error:", *a[:2], file=sys.stderr)
        win.resize(*SIZE)
        finished: list[dict] = []
        win.labeling.run_finished.connect(finished.append)
        win.project.open(project)
        win.labeling.label_when_scanned()
        win.show()
        wait_until(lambda: bool(finished), "the labeling run", 600)
        settle(win)
        shoot_map(win, args.out / "embedding-map.png", args.max_kb)
        shoot_duplicates(win, args.out / "duplicates.png", args.max_kb)
        win.project.stack.setClean()
        win.ask_unsaved = lambda: "discard"
        win.close()
        app.processEvents()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
