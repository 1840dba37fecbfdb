"""GUI building blocks: the generator worker, lazy thumbnails, project files, autosave,
recent projects, the exception hook, closing with unsaved changes, and the demo screenshot."""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("pytestqt")

from _gui_helpers import FakeSession, make_image, tiny_checkpoint
from PySide6.QtGui import QImage

from fewshot_studio.engine.api import LabelSettings
from fewshot_studio.gui import project_io as pio
from fewshot_studio.gui.thumbnails import ThumbnailCache
from fewshot_studio.gui.workers import FunctionWorker, GeneratorWorker, bind_to


def test_generator_worker_yields_finishes_and_runs_off_thread(qtbot) -> None:
    seen, threads = [], []

    def gen(n: int) -> Iterator[int]:
        threads.append(threading.get_ident())
        yield from range(n)
        return "done"

    w = GeneratorWorker(gen, 4)
    w.yielded.connect(seen.append)
    with qtbot.waitSignal(w.finished, timeout=5000) as sig:
        w.start()
    assert sig.args == ["done"] and seen == [0, 1, 2, 3]
    assert threads[0] != threading.main_thread().ident == threading.get_ident()


def test_generator_worker_cancel_closes_the_generator(qtbot) -> None:
    closed = threading.Event()
    gate = threading.Event()

    def gen() -> Iterator[int]:
        try:
            i = 0
            while True:
                gate.wait(5)
                yield i
                i += 1
        finally:
            closed.set()

    w = GeneratorWorker(gen)
    finished = []
    w.finished.connect(finished.append)
    with qtbot.waitSignal(w.signals.cancelled, timeout=5000):
        w.start()
        qtbot.wait(50)
        w.cancel()
        gate.set()
    assert closed.wait(2) and not finished


def test_function_worker_reports_errors(qtbot) -> None:
    def boom() -> None:
        raise ValueError("nope")

    w = FunctionWorker(boom)
    with qtbot.waitSignal(w.errored, timeout=5000) as sig:
        w.start()
    assert isinstance(sig.args[0], ValueError)


def test_function_worker_returns_a_plain_functions_value_off_thread(qtbot) -> None:
    threads = []

    def add(a: int, b: int = 0) -> int:
        threads.append(threading.get_ident())
        return a + b

    w = FunctionWorker(add, 2, b=3)
    yielded, finished = [], []
    w.yielded.connect(yielded.append)
    w.finished.connect(finished.append)
    # ``done`` comes last, after ``finished`` and after ``is_done`` is set in the pool thread
    with qtbot.waitSignal(w.signals.done, timeout=5000):
        w.start()
    assert finished == [5] and not yielded and w.is_done
    assert threads == [w.thread_ident] and w.thread_ident != threading.get_ident()


def test_a_function_worker_cancelled_before_it_starts_never_runs(qtbot) -> None:
    ran = []
    w = FunctionWorker(lambda: ran.append(1))
    w.cancel()
    with qtbot.waitSignal(w.signals.cancelled, timeout=5000):
        w.start()
    assert not ran


def test_thumbnails_load_lazily_and_mark_errors(qtbot, tmp_path: Path) -> None:
    good = make_image(tmp_path / "g.jpg", (10, 200, 10), 0, size=300)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    cache = ThumbnailCache(size=64, capacity=1)
    assert cache.get(good) is None  # not yet: queued
    with qtbot.waitSignal(cache.ready, timeout=5000):
        pass
    pm = cache.get(good)
    assert pm is not None and max(pm.width(), pm.height()) == 64
    assert cache.get(bad) is None
    qtbot.waitUntil(lambda: cache.error(bad) is not None, timeout=5000)
    assert cache.get(bad) is None and cache.decoded == 2  # an error is not retried
    other = make_image(tmp_path / "o.png", (1, 1, 1), 1)
    cache.get(other)
    qtbot.waitUntil(lambda: cache.get(other) is not None, timeout=5000)
    assert str(good) not in cache._cache  # LRU capacity 1


def _unblock_fifo(fifo: Path) -> None:
    """Open a FIFO's write end and close it: a reader stuck in open() gets EOF (so a
    regression fails the test instead of hanging the pool and the interpreter's exit)."""
    import contextlib
    import os

    with contextlib.suppress(OSError):  # no reader: nothing is blocked on it
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


@pytest.mark.skipif(not hasattr(__import__("os"), "mkfifo"), reason="needs named pipes")
def test_thumbnails_fifos_get_error_tiles_and_the_pool_finishes(qtbot, tmp_path: Path) -> None:
    import os

    images = [make_image(tmp_path / f"img{i}.png", (200, 30 * i, 30), i) for i in range(3)]
    fifos = [tmp_path / "pipe1.jpg", tmp_path / "pipe2.png"]
    for f in fifos:
        os.mkfifo(f)
    cache = ThumbnailCache(size=32, threads=2)
    try:
        for p in fifos + images:  # the FIFOs first: with 2 threads they would take both
            cache.get(p)
        qtbot.waitUntil(lambda: all(cache.get(p) is not None for p in images)
                        and all(cache.error(f) is not None for f in fifos), timeout=5000)
        assert cache.wait_idle(3000)
    finally:
        for f in fifos:
            _unblock_fifo(f)
        cache.wait_idle(5000)
    for f in fifos:
        assert "not a regular file" in cache.error(f)


def test_project_file_round_trip_relative_paths(tmp_path: Path) -> None:
    folder = tmp_path / "proj"
    ex = make_image(folder / "examples" / "a.png", (1, 2, 3), 0)
    outside = make_image(tmp_path / "elsewhere" / "b.png", (4, 5, 6), 1)
    q = folder / "queries"
    q.mkdir()
    p = pio.Project(classes=[pio.ClassSpec("A", "#111111", [ex, outside]),
                             pio.ClassSpec("B", "#222222", [])],
                    query_folder=q, corrections={q / "x.png": "B"}, checkpoint="tiny",
                    settings=LabelSettings(unknown_threshold=0.3, transductive=True))
    saved = pio.save_project(p, folder / "mine")
    assert saved.path == folder / "mine.fsproj"
    text = saved.path.read_text()
    assert '"examples/a.png"' in text and str(outside) in text
    moved = tmp_path / "moved"
    folder.rename(moved)
    back = pio.load_project(moved / "mine.fsproj")
    assert back.classes[0].examples == [moved / "examples" / "a.png", outside]
    assert back.query_folder == moved / "queries"
    assert back.corrections == {moved / "queries" / "x.png": "B"}
    assert back.settings == p.settings and back.checkpoint == "tiny"
    assert pio.cache_path_for(back.path) is None  # the user cache dir's: none beside it
    with pytest.raises(pio.UserError):
        pio.load_project(tmp_path / "nope.fsproj")
    (tmp_path / "junk.fsproj").write_text("[1, 2]")
    with pytest.raises(pio.UserError):
        pio.load_project(tmp_path / "junk.fsproj")


def test_autosave_and_recent(tmp_path: Path) -> None:
    proj = pio.save_project(pio.Project(checkpoint="x"), tmp_path / "p.fsproj")
    assert pio.find_autosave(proj.path) is None
    changed = pio.Project(classes=[pio.ClassSpec("new", "#000000")], path=proj.path)
    a = pio.write_autosave(changed)
    import os

    os.utime(a, (proj.path.stat().st_mtime + 5,) * 2)
    assert pio.find_autosave(proj.path) == a
    rec = pio.load_autosave(a)
    assert rec.class_names() == ["new"] and rec.path == proj.path
    pio.discard_autosave(proj.path)
    assert pio.find_autosave(proj.path) is None
    recent = pio.RecentProjects(tmp_path / "recent.json", limit=2)
    others = [pio.save_project(pio.Project(), tmp_path / f"r{i}").path for i in range(3)]
    for o in others:
        recent.add(o)
    assert recent.list() == [others[2], others[1]]
    others[2].unlink()
    assert recent.list() == [others[1]]


def test_excepthook_logs_and_shows(tmp_path: Path) -> None:
    from fewshot_studio.gui import excepthook

    shown = []
    log_path = excepthook.setup_logging()
    prev = excepthook.install(lambda *a: shown.append(a))
    try:
        try:
            raise RuntimeError("kaboom")
        except RuntimeError:
            sys.excepthook(*sys.exc_info())
    finally:
        sys.excepthook = prev
    for h in logging.getLogger("fewshot_studio").handlers:
        h.flush()
    assert shown and shown[0][1] == "RuntimeError: kaboom" and "Traceback" in shown[0][2]
    assert log_path is not None and "kaboom" in log_path.read_text()


def test_close_with_unsaved_changes_asks(qtbot) -> None:
    from fewshot_studio.gui.main_window import MainWindow

    w = MainWindow(restore_state=False)
    qtbot.addWidget(w)
    w.show()
    w.classes_ctl.add_class("x")
    asked = []
    w.ask_unsaved = lambda: asked.append(1) or "cancel"
    assert not w.close() and w.isVisible() and asked
    w.ask_unsaved = lambda: "discard"
    assert w.close()


def test_demo_screenshot(qtbot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--demo --screenshot``: labels the bundled demo and writes a PNG (the tiny checkpoint
    stands in for the bundled one)."""
    from fewshot_studio import paths
    from fewshot_studio.gui import app as gui_app
    from fewshot_studio.gui.controllers import project as project_ctl

    ck = tiny_checkpoint(tmp_path / "tiny.safetensors")
    monkeypatch.setattr(paths, "bundled_checkpoints", lambda: {"tiny": ck})
    monkeypatch.setattr(project_ctl.app_paths, "bundled_checkpoints", lambda: {"tiny": ck})
    out = tmp_path / "shot.png"
    code = gui_app.run_app(argparse.Namespace(demo=True, screenshot=str(out), project=None))
    assert code == 0
    img = QImage(str(out))
    assert img.width() >= 1000 and img.height() >= 600
    assert len(list(pio.load_demo_project().query_folder.glob("*.jpg"))) >= 60


class _SlowSession(FakeSession):
    """A fake engine whose run streams slowly, for cancelling."""

    delay = 0.05

    def __init__(self, checkpoint: str, settings: LabelSettings, cache_path: Path | None) -> None:
        super().__init__(checkpoint, settings, cache_path)
        self.closed_run = threading.Event()

    def guess(self, index: int, path: Path):
        from fewshot_studio.engine.api import Prediction, Status

        return Prediction(path, self.names[0], 0.9, 0.5, Status.OK, ((self.names[0], 0.9),))

    def run(self, paths: list[Path]) -> Iterator:
        import time

        from fewshot_studio.progress import Progress

        try:
            for i, p in enumerate(paths):
                time.sleep(self.delay)
                self.paths.append(p)
                yield Progress(i + 1, len(paths), "", payload=[self.prediction(i, p)])
        finally:
            self.closed_run.set()


def test_cancel_labeling_and_autosave(qtbot, tmp_path: Path) -> None:
    from fewshot_studio.gui.main_window import MainWindow

    for i in range(40):
        make_image(tmp_path / "q" / f"{i}.png", (i, i, i), i)
    ex = [make_image(tmp_path / "s" / f"{i}.png", (i, 0, 0), i) for i in range(2)]
    w = MainWindow(session_factory=_SlowSession, restore_state=False)
    qtbot.addWidget(w)
    w.show_error = lambda *a: pytest.fail(f"error dialog: {a}")
    w.ask_unsaved = lambda: "discard"
    w.project.apply(pio.Project(classes=[pio.ClassSpec("a", "#111111", ex[:1]),
                                         pio.ClassSpec("b", "#222222", ex[1:2])],
                                query_folder=tmp_path / "q", checkpoint="fake"))
    qtbot.waitUntil(lambda: w.gallery_model.rowCount() == 40, timeout=5000)
    w.labeling.label()
    assert w.labeling.busy and not w.acts.label.isEnabled() and w.acts.cancel.isEnabled()
    qtbot.waitUntil(lambda: w.gallery_model.labeled_count() >= 2, timeout=5000)  # streaming
    with qtbot.waitSignal(w.labeling.run_cancelled, timeout=5000):
        w.acts.cancel.trigger()  # Esc
    qtbot.waitUntil(lambda: not w.labeling.busy, timeout=5000)
    assert w.labeling.host.session.closed_run.is_set()  # the engine's generator was closed
    assert w.gallery_model.labeled_count() < 40 and w.acts.label.isEnabled()
    assert not w.labeling.labeled
    # autosave writes a recovery file only when there are unsaved changes
    assert w.project.autosave() is None
    w.classes_ctl.add_class("c")
    rec = w.project.autosave()
    assert rec is not None and pio.load_autosave(rec).class_names() == ["a", "b", "c"]
    w.close()


def test_edits_during_a_run_reach_the_engine_after_it(qtbot, tmp_path: Path) -> None:
    from fewshot_studio.gui.main_window import MainWindow

    for i in range(12):
        make_image(tmp_path / "q" / f"{i}.png", (i, i, i), i)
    ex = [make_image(tmp_path / "s" / f"{i}.png", (i, 0, 0), i) for i in range(2)]
    w = MainWindow(session_factory=_SlowSession, restore_state=False)
    qtbot.addWidget(w)
    w.show_error = lambda *a: pytest.fail(f"error dialog: {a}")
    w.ask_unsaved = lambda: "discard"
    w.project.apply(pio.Project(classes=[pio.ClassSpec("a", "#111111", ex[:1]),
                                         pio.ClassSpec("b", "#222222", ex[1:2])],
                                query_folder=tmp_path / "q", checkpoint="fake"))
    qtbot.waitUntil(lambda: w.gallery_model.rowCount() == 12, timeout=5000)
    with qtbot.waitSignal(w.labeling.run_finished, timeout=10_000):
        w.labeling.label()
        qtbot.waitUntil(lambda: w.gallery_model.labeled_count() >= 1, timeout=5000)
        target = w.gallery_model.paths()[5]
        w.correct_paths([target], 1)  # while the run goes on
    session = w.labeling.host.session
    qtbot.waitUntil(lambda: session.corr.get(target) == "b", timeout=5000)
    w.close()


def test_tiles_mark_unknown_corrected_and_error_distinctly(qtbot, tmp_path: Path) -> None:
    from PySide6.QtGui import QColor, QPainter

    from fewshot_studio.engine.api import Prediction, Status
    from fewshot_studio.gui.views.gallery import TILE, TileDelegate

    d = TileDelegate()
    path = str(tmp_path / "x.jpg")
    top = (("cat", 0.3), ("dog", 0.2))
    preds = {
        "none": None,
        "ok": Prediction(Path(path), "cat", 0.8, 0.5, Status.OK, top),
        "unknown": Prediction(Path(path), None, 0.3, 0.1, Status.UNKNOWN, top),
        "corrected": Prediction(Path(path), "cat", 1.0, 1.0, Status.OK, top, "", True),
        "error": Prediction(Path(path), None, 0.0, 0.0, Status.ERROR, (), "truncated"),
    }
    images = {}
    for name, pred in preds.items():
        img = QImage(TILE, QImage.Format.Format_ARGB32)
        img.fill(0)
        p = QPainter(img)
        d._render(p, path, pred, None, pred.error if pred else "", QColor("#2563eb"),
                  False, False)
        p.end()
        images[name] = img
    names = list(images)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert images[a] != images[b], f"{a} and {b} tiles look the same"

    def count(img: QImage, rgb: tuple[int, int, int]) -> int:
        return sum(img.pixelColor(x, y).getRgb()[:3] == rgb
                   for x in range(0, img.width(), 2) for y in range(0, img.height(), 2))

    assert count(images["error"], (0xdc, 0x26, 0x26)) > 20  # red error badge
    assert count(images["corrected"], (0x16, 0xa3, 0x4a)) > 20  # green check
    assert count(images["ok"], (0x25, 0x63, 0xeb)) > 20  # class-coloured badge
    assert count(images["unknown"], (0x25, 0x63, 0xeb)) == 0  # no class colour when unknown


@pytest.mark.parametrize("doc", ['{"format": "fewshot-studio-project/1", "classes": "abc"}',
                                 "[" * 100_000 + "]" * 100_000])
def test_bad_project_file_shows_a_normal_message(qtbot, tmp_path: Path, doc: str) -> None:
    """Opening a damaged project reports a one-line message (not the "uncaught exception"
    dialog) and leaves the open project as it was."""
    from fewshot_studio.gui.main_window import MainWindow

    w = MainWindow(restore_state=False)
    qtbot.addWidget(w)
    shown: list[tuple[str, str, str]] = []
    w.show_error = lambda title, message, details="": shown.append((title, message, details))
    before = w.project.snapshot()
    bad = tmp_path / "bad.fsproj"
    bad.write_text(doc)
    w.commands.open_project(bad)  # raises if the error is not a UserError
    assert len(shown) == 1 and shown[0][0] == "Cannot open the project", shown
    assert str(bad) in shown[0][1] and "\n" not in shown[0][1] and not shown[0][2]
    assert w.project.snapshot() == before and w.project.path is None


def test_item_views_keep_the_reference_count_of_none(qtbot) -> None:
    """The locked PySide6 must not drop references to None in the item-view calls the class
    panel makes per example (6.12.0 on CPython 3.11 does: the app then aborts with "Fatal
    Python error: none_dealloc" after about 10k examples)."""
    from PySide6.QtCore import QSize, Qt
    from PySide6.QtWidgets import QListWidget, QListWidgetItem

    w = QListWidget()
    qtbot.addWidget(w)
    before = sys.getrefcount(None)
    for i in range(2000):
        item = QListWidgetItem(f"example {i}")
        item.setData(Qt.ItemDataRole.UserRole, f"/images/{i}.png")
        item.setSizeHint(QSize(52, 52))
        item.setToolTip(str(i))
        w.addItem(item)
    assert w.count() == 2000
    assert sys.getrefcount(None) - before > -100  # 6.12.0: -4000


def test_export_menu_and_writer_come_from_the_format_table(qtbot, tmp_path: Path) -> None:
    """File > Export lists every format of ``EXPORT_FORMATS`` (then the class-folder copy),
    and the controller writes each through the table: a FiftyOne export names the classes."""
    import json

    from fewshot_studio.engine.api import Prediction, Status
    from fewshot_studio.engine.export import EXPORT_FORMATS
    from fewshot_studio.gui.controllers.export import ExportController
    from fewshot_studio.gui.main_window import MainWindow

    w = MainWindow(restore_state=False)
    qtbot.addWidget(w)
    menu = next(a.menu() for a in w.menuBar().actions() if a.text() == "&File")
    export_menu = next(a.menu() for a in menu.actions() if a.menu() and "xport" in a.text())
    titles = [a.text() for a in export_menu.actions()]
    assert len(titles) == len(EXPORT_FORMATS) + 1
    assert [t.split("…")[0] for t in titles[:-1]] == [
        f"Export {f.title.split(' (')[0]}" for f in EXPORT_FORMATS.values()]
    root = tmp_path / "q"
    preds = [Prediction(root / "a.jpg", "dog", 0.9, 0.5, Status.OK, (("dog", 0.9),))]
    ctl = ExportController()
    out = tmp_path / "labels.json"
    with qtbot.waitSignal(ctl.finished, timeout=10_000):
        ctl.export_file("fiftyone", preds, out, root, ["cat", "dog"])
    doc = json.loads(out.read_text(encoding="utf-8"))
    assert doc["classes"] == ["cat", "dog"]


def test_a_job_that_outlives_its_owner_reports_to_no_one(qtbot) -> None:
    """A window closed while its job runs: the job's report must not reach the deleted
    controller (emitting its signal would raise "Signal source has been deleted")."""
    import shiboken6
    from PySide6.QtCore import QObject, Signal

    class Owner(QObject):
        said = Signal(object)

    owner, heard = Owner(), []
    owner.said.connect(heard.append)
    gate = threading.Event()
    w = FunctionWorker(lambda: gate.wait(5) and "done")
    w.signals.finished.connect(bind_to(owner, lambda v: owner.said.emit(v)))
    w.start()
    shiboken6.delete(owner)  # the window goes while the job still runs
    gate.set()
    qtbot.waitUntil(lambda: w.is_done, timeout=5_000)
    qtbot.wait(50)
    assert heard == [] and not shiboken6.isValid(owner)

    alive, heard2 = Owner(), []
    alive.said.connect(heard2.append)
    w2 = FunctionWorker(lambda: "done")
    w2.signals.finished.connect(bind_to(alive, lambda v: alive.said.emit(v)))
    w2.start()
    qtbot.waitUntil(lambda: heard2 == ["done"], timeout=5_000)

