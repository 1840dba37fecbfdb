"""The embedding map widget (gui/views/embedding_map.py), fed synthetic points: hover and
click report the point, a rectangle or a lasso reports the points inside, the colour modes
colour by class / confidence / reviewed, support examples are drawn apart."""

from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PySide6.QtCore import QPoint, QPointF, Qt
from PySide6.QtGui import QColor, QPixmap

from fewshot_studio.gui.models.gallery import Role
from fewshot_studio.gui.views.embedding_map import (
    NO_LABEL,
    REVIEWED,
    UNREVIEWED,
    EmbeddingMapPanel,
    MapCanvas,
    MapPoints,
    _argb,
    _Grid,
    points_in_polygon,
)


@pytest.fixture
def canvas(qtbot) -> MapCanvas:
    c = MapCanvas()
    qtbot.addWidget(c)
    c.resize(400, 300)
    c.show()
    qtbot.waitExposed(c)
    return c


def _grid_points() -> MapPoints:
    """A 10 x 10 grid of points at integer coordinates 0..9; point i = (i % 10, i // 10).
    Points 0..49 are class 0, 50..99 class 1; confidence i / 99; even points reviewed;
    point 99 a support example."""
    i = np.arange(100)
    xy = np.stack([i % 10, i // 10], axis=1).astype(np.float64)
    support = i == 99
    return MapPoints(xy, support, np.where(i < 50, 0, 1), i / 99.0, i % 2 == 0,
                     [QColor("#ff0000"), QColor("#0000ff")])


def _screen(c: MapCanvas, i: int) -> QPoint:
    x, y = c.to_screen(c.points.xy[[i]])[0]
    return QPoint(round(x), round(y))


def test_hover_reports_the_point_and_shows_its_thumbnail(qtbot, canvas: MapCanvas) -> None:
    canvas.set_points(_grid_points())
    seen: list[int] = []
    canvas.hovered.connect(seen.append)
    qtbot.mouseMove(canvas, _screen(canvas, 23))
    qtbot.waitUntil(lambda: seen[-1:] == [23])
    assert canvas.hover_index == 23
    # a thumbnail for another point is ignored; the hovered one's is drawn
    canvas.set_thumbnail(5, QPixmap(8, 8))
    assert canvas._thumb is None
    pix = QPixmap(16, 16)
    pix.fill(QColor("#00ff00"))
    canvas.set_thumbnail(23, pix)
    grab = canvas.grab().toImage()
    p = _screen(canvas, 23)
    greens = [grab.pixelColor(x, y).name() for x in range(p.x() + 10, min(400, p.x() + 40))
              for y in (p.y(),)]
    assert "#00ff00" in greens
    # empty space between points: no point
    qtbot.mouseMove(canvas, (_screen(canvas, 0) + _screen(canvas, 11)) / 2)
    qtbot.waitUntil(lambda: seen[-1] == -1)


def test_click_selects_the_point_under_the_cursor(qtbot, canvas: MapCanvas) -> None:
    canvas.set_points(_grid_points())
    clicked: list[int] = []
    canvas.clicked.connect(clicked.append)
    qtbot.mouseClick(canvas, Qt.MouseButton.LeftButton, pos=_screen(canvas, 57))
    qtbot.mouseClick(canvas, Qt.MouseButton.LeftButton,
                     pos=_screen(canvas, 57) + QPoint(2, 1))  # within the hit radius
    mid = (_screen(canvas, 0) + _screen(canvas, 11)) / 2
    qtbot.mouseClick(canvas, Qt.MouseButton.LeftButton, pos=mid)  # nothing there
    assert clicked == [57, 57]


def _drag(qtbot, c: MapCanvas, points: list[QPoint],
          mods: Qt.KeyboardModifier = Qt.KeyboardModifier.NoModifier) -> None:
    qtbot.mousePress(c, Qt.MouseButton.LeftButton, mods, points[0])
    for p in points[1:]:
        qtbot.mouseMove(c, p)
    qtbot.mouseRelease(c, Qt.MouseButton.LeftButton, mods, points[-1])


def test_rectangle_selection_reports_the_points_inside(qtbot, canvas: MapCanvas) -> None:
    canvas.set_points(_grid_points())
    got: list[list[int]] = []
    canvas.selected.connect(got.append)
    # world (1.5, 1.5) .. (3.5, 4.5): x in {2, 3}, y in {2, 3, 4}
    a, b = canvas.to_screen(np.array([[1.5, 1.5], [3.5, 4.5]]))
    canvas.set_tool("rect")
    _drag(qtbot, canvas, [QPoint(*map(round, a)), QPoint(*map(round, b))])
    expected = sorted(y * 10 + x for x in (2, 3) for y in (2, 3, 4))
    assert got == [expected]
    # Shift+drag is a rectangle whatever the tool; the pan tool does not select
    canvas.set_tool("pan")
    _drag(qtbot, canvas, [QPoint(*map(round, b)), QPoint(*map(round, a))],
          Qt.KeyboardModifier.ShiftModifier)
    assert got[-1] == expected
    before = canvas.center.copy()
    _drag(qtbot, canvas, [QPoint(100, 100), QPoint(140, 100)])
    assert len(got) == 2 and canvas.center[0] < before[0]  # panned: the points moved right


def test_lasso_selection_reports_the_points_inside(qtbot, canvas: MapCanvas) -> None:
    canvas.set_points(_grid_points())
    got: list[list[int]] = []
    canvas.selected.connect(got.append)
    canvas.set_tool("lasso")
    # a closed triangle (0.5, 0.5) - (6.3, 0.5) - (0.5, 6.3): points with x, y >= 1 and
    # x + y <= 6 (the release is where the press was: still a lasso, not a click)
    tri = canvas.to_screen(np.array([[0.5, 0.5], [6.3, 0.5], [0.5, 6.3], [0.5, 0.5]]))
    path = []
    for (x0, y0), (x1, y1) in itertools.pairwise(tri):
        path += [QPoint(round(x0 + (x1 - x0) * t), round(y0 + (y1 - y0) * t))
                 for t in np.linspace(0, 1, 12)]
    _drag(qtbot, canvas, path)
    expected = sorted(y * 10 + x for x in range(1, 7) for y in range(1, 7) if x + y <= 6)
    assert got == [expected]


def test_points_in_polygon_even_odd() -> None:
    square = np.array([[0, 0], [4, 0], [4, 4], [0, 4]], float)
    pts = np.array([[1, 1], [5, 1], [3.9, 3.9], [-1, 2], [2, 4.1]], float)
    assert points_in_polygon(pts, square).tolist() == [True, False, True, False, False]
    assert not points_in_polygon(pts, square[:2]).any()


def test_colour_modes(canvas: MapCanvas) -> None:
    pts = _grid_points()
    pts.label[7] = -1  # no label
    pts.confidence[8] = np.nan
    canvas.set_points(pts)
    col = canvas.point_colors()
    assert col[0] == _argb(QColor("#ff0000")) and col[60] == _argb(QColor("#0000ff"))
    assert col[7] == _argb(NO_LABEL)
    canvas.set_color_mode("confidence")
    col = canvas.point_colors()
    assert col[0] != col[98] and col[8] == _argb(NO_LABEL)
    red0, green0 = QColor(int(col[0])).red(), QColor(int(col[0])).green()
    red1, green1 = QColor(int(col[98])).red(), QColor(int(col[98])).green()
    assert red0 > green0 and green1 > red1  # low confidence red, high green
    canvas.set_color_mode("reviewed")
    col = canvas.point_colors()
    assert col[0] == _argb(REVIEWED) and col[1] == _argb(UNREVIEWED)
    with pytest.raises(ValueError):
        canvas.set_color_mode("size")


def test_support_examples_are_drawn_larger_and_outlined(canvas: MapCanvas) -> None:
    canvas.set_points(_grid_points())
    img = canvas.grab().toImage()
    sup, q = _screen(canvas, 99), _screen(canvas, 98)
    blue = QColor("#0000ff").name()
    assert img.pixelColor(sup + QPoint(3, 0)).name() == blue  # a query dot is 2 px wide
    assert img.pixelColor(q + QPoint(3, 0)).name() != blue
    assert img.pixelColor(sup + QPoint(5, 0)).name() == "#202020"  # the outline


def test_zoom_keeps_the_point_under_the_cursor_and_pan_moves(canvas: MapCanvas) -> None:
    canvas.set_points(_grid_points())
    p = QPointF(_screen(canvas, 55))
    scale = canvas.scale
    canvas.zoom_at(p, 3.0)
    assert canvas.scale == pytest.approx(3 * scale)
    assert canvas.index_at(p) == 55
    canvas.zoom_at(p, 1e-6)  # clamped at half the fitted scale
    assert canvas.scale == pytest.approx(scale / 2)
    canvas.fit()
    canvas.pan_by(30, 0)
    assert canvas.to_screen(canvas.points.xy[[55]])[0][0] == pytest.approx(p.x() + 30, abs=1)


def test_grid_nearest_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    xy = rng.normal(size=(2000, 2))
    g = _Grid(xy)
    for q in rng.normal(size=(200, 2)) * 1.5:
        d = np.linalg.norm(xy - q, axis=1)
        want = int(d.argmin()) if d.min() <= 0.05 else -1
        assert g.nearest(q, 0.05) == want
    assert _Grid(np.zeros((0, 2))).nearest(np.zeros(2), 1.0) == -1


def test_panel_controls_drive_the_canvas(qtbot) -> None:
    panel = EmbeddingMapPanel()
    qtbot.addWidget(panel)
    panel.color_box.setCurrentIndex(panel.color_box.findData("reviewed"))
    assert panel.canvas.color_mode == "reviewed"
    panel.tool_buttons["lasso"].click()
    assert panel.canvas.tool == "lasso"
    panel.set_status("PCA · 100 points")
    assert panel.status.text() == "PCA · 100 points"


# -- in the window (real engine, tiny checkpoint; the fixtures live in test_find_similar) ------
import test_find_similar as fs  # noqa: E402

N_QUERY = fs.N_QUERY


@pytest.fixture(scope="module")
def map_data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return fs.make_similar_data(tmp_path_factory)


@pytest.fixture
def labeled_win(qtbot, map_data: dict, tmp_path: Path):
    yield from fs.labeled_window(qtbot, map_data, tmp_path)


def _open_map(qtbot, w):
    """View > Embedding map, then wait for the projection."""
    ctl = w.embedding_map
    view = next(a.menu() for a in w.menuBar().actions() if a.text() == "&View")
    toggle = ctl.dock.toggleViewAction()
    assert toggle in view.actions() and not ctl.dock.isVisible()
    with qtbot.waitSignal(ctl.map_ready, timeout=20_000):
        toggle.trigger()
    qtbot.waitUntil(lambda: ctl.workers[-1].is_done, timeout=120_000)  # UMAP, if installed
    qtbot.wait(50)
    assert ctl.workers[-1].thread_ident not in (None, threading.get_ident())  # a worker's
    return ctl


def test_map_shows_queries_and_examples_hover_and_click(qtbot, labeled_win) -> None:
    w = labeled_win
    ctl = _open_map(qtbot, w)
    n_examples = 3 * 2
    assert len(ctl.paths) == 3 * N_QUERY + n_examples  # broken.jpg has no feature: not shown
    pts = ctl.canvas.points
    assert pts.support.sum() == n_examples and pts.xy.shape == (len(ctl.paths), 2)
    assert "without features" in w.embedding_map.panel.status.text()
    names = w.classes.names()
    for i, p in enumerate(ctl.paths):  # coloured by the predicted class
        pred = w.gallery_model.prediction_for(p)
        if pred is not None:
            assert pts.label[i] == names.index(pred.label)
    # hover: the thumbnail arrives; click: the image is selected in the gallery
    i = next(k for k, p in enumerate(ctl.paths) if p.name == "green_0002.png")
    ctl.canvas.hover_index = i
    ctl.canvas.hovered.emit(i)
    qtbot.waitUntil(lambda: ctl.canvas._thumb is not None, timeout=10_000)
    ctl.canvas.clicked.emit(i)
    assert Path(w.gallery.currentIndex().data(Role.PATH)) == ctl.paths[i]
    assert w.detail.name.text() == "green_0002.png"
    # a class example is not in the gallery: the status bar names its class instead
    ex = int(np.flatnonzero(pts.support)[0])
    with qtbot.waitSignal(ctl.message) as sig:
        ctl.canvas.clicked.emit(ex)
    assert "an example of" in sig.args[0]
    assert Path(w.gallery.currentIndex().data(Role.PATH)) == ctl.paths[i]


def test_rectangle_assign_adds_examples_and_relabels(qtbot, labeled_win) -> None:
    from _gui_helpers import wait_idle

    w = labeled_win
    ctl = _open_map(qtbot, w)
    c = ctl.canvas
    # a real drag over the whole map: every point; the class examples are left out
    asked: list[int] = []
    ctl.ask_class = lambda n: (asked.append(n), None)[1]  # cancelled
    c.set_tool("rect")
    qtbot.mousePress(c, Qt.MouseButton.LeftButton, pos=QPoint(1, 1))
    qtbot.mouseMove(c, QPoint(c.width() - 2, c.height() - 2))
    qtbot.mouseRelease(c, Qt.MouseButton.LeftButton, pos=QPoint(c.width() - 2, c.height() - 2))
    assert asked == [3 * N_QUERY]
    assert w.labeling.corrections == {}
    # assign three red images to "green": they join green's examples, everything relabels
    red = [k for k, p in enumerate(ctl.paths) if p.name.startswith("red_")]
    others = [ctl.paths[k] for k in red[3:]]
    green_before = [dict(w.gallery_model.prediction_for(p).top).get("green", 0.0)
                    for p in others]
    ctl.ask_class = lambda n: 1
    with qtbot.waitSignal(w.labeling.relabeled, timeout=10_000):
        c.selected.emit(red[:3])
    wait_idle(qtbot, w)
    chosen = [ctl.paths[k] for k in red[:3]]
    assert w.labeling.corrections == {p: "green" for p in chosen}
    assert w.labeling.settings.corrections_join_support
    green_after = [dict(w.gallery_model.prediction_for(p).top).get("green", 0.0)
                   for p in others]
    assert all(a > b for a, b in zip(green_after, green_before, strict=True))  # relabeled
    qtbot.waitUntil(lambda: c.points.support.sum() == 3 * 2 + 3)  # drawn as examples now
    assert all(c.points.label[k] == 1 for k in red[:3])
    w.stack.undo()
    wait_idle(qtbot, w)
    assert w.labeling.corrections == {}
    qtbot.waitUntil(lambda: c.points.support.sum() == 3 * 2)


@pytest.fixture
def tta_win(qtbot, map_data: dict, tmp_path: Path):
    yield from fs.labeled_window(qtbot, map_data, tmp_path, tta=True)


def test_map_reads_the_features_the_run_cached_with_tta(qtbot, tta_win) -> None:
    """Test-time augmentation caches features under their own key: the map finds them all
    (only the broken file has none)."""
    w = tta_win
    assert w.labeling.feature_id.endswith(":tta2")
    ctl = _open_map(qtbot, w)
    assert len(ctl.paths) == 3 * N_QUERY + 3 * 2
    assert "1 without features" in ctl.panel.status.text()


# -- the slow projection runs in a child process that closing the window kills ----------------
def _first_two(x: np.ndarray, seed: int) -> np.ndarray:  # runs in the child
    return x[:, :2] + seed


def _fails(x: np.ndarray, seed: int) -> np.ndarray:
    raise ValueError("no map today")


def _sleepy(x: np.ndarray, seed: int) -> np.ndarray:  # a projection that takes ten minutes
    time.sleep(600)
    return np.zeros((len(x), 2), np.float32)


def _in_thread(proc, x: np.ndarray) -> tuple[threading.Thread, list[object]]:
    """``proc.run(x)`` in a thread; returns once the child is computing."""
    out: list[object] = []
    t = threading.Thread(target=lambda: out.append(proc.run(x)))
    t.start()
    deadline = time.monotonic() + 30
    while not proc.running and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)  # the request is in the child
    return t, out


def _interrupt_slow_run(proc, x: np.ndarray, interrupt) -> None:
    """Start a ten-minute run of ``proc`` in a thread, then ``interrupt()``: the run returns
    None within 5 s."""
    proc.target = _sleepy
    t, out = _in_thread(proc, x)
    t0 = time.monotonic()
    interrupt()
    t.join(10)
    assert not t.is_alive() and time.monotonic() - t0 < 5 and out == [None]


def test_projection_process_returns_reports_cancels_and_stops() -> None:
    from fewshot_studio.engine.projection import ProjectionProcess

    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    proc = ProjectionProcess(_first_two, requires=None)
    assert proc.ready() and not ProjectionProcess(requires="no_such_module_here").ready()
    np.testing.assert_array_equal(proc.run(x, seed=1), x[:, :2] + 1)
    child = proc._proc
    np.testing.assert_array_equal(proc.run(x * 2), x[:, :2] * 2)
    assert proc._proc is child and child.is_alive()  # one child, kept between runs
    proc.target = _fails
    with pytest.raises(RuntimeError, match="ValueError: no map today"):
        proc.run(x)
    # a slow run: cancel() kills it at once, the next run starts a new child
    _interrupt_slow_run(proc, x, proc.cancel)
    assert not child.is_alive()
    proc.target = _first_two
    np.testing.assert_array_equal(proc.run(x), x[:, :2])
    # stop(): kills a slow run too, and refuses any later one
    _interrupt_slow_run(proc, x, proc.stop)
    assert not proc.ready() and proc.run(x) is None
    # stop() with an idle child: told to exit, it cleans up and ends by itself (code 0)
    idle = ProjectionProcess(_first_two, requires=None)
    assert idle.run(x) is not None
    child = idle._proc
    idle.stop()
    child.join(10)
    assert child.exitcode == 0


def test_closing_the_window_never_waits_on_a_projection(qtbot, labeled_win) -> None:
    from fewshot_studio.engine.projection import ProjectionProcess

    w = labeled_win
    ctl = w.embedding_map
    made: list[ProjectionProcess] = []
    ctl.slow_projection = lambda: made.append(ProjectionProcess(_sleepy, None)) or made[-1]
    with qtbot.waitSignal(ctl.map_ready, timeout=20_000):
        ctl.dock.toggleViewAction().trigger()
    assert ctl.method == "PCA" and "computing UMAP" in ctl.panel.status.text()
    qtbot.waitUntil(lambda: made[-1].running, timeout=20_000)  # the child is sleeping
    t0 = time.monotonic()
    w.close()
    assert ctl.pool.waitForDone(5_000)  # the projection thread is free at once
    assert time.monotonic() - t0 < 5
    assert not made[-1].running and ctl.workers[-1].is_done and len(made) == 1
    assert ctl.method == "PCA"  # nothing from the stopped projection was shown


# -- Help > Keyboard shortcuts is read off the actions -----------------------------------------
def test_help_lists_every_action_with_a_shortcut(qtbot) -> None:
    from _gui_helpers import shown_window
    from PySide6.QtGui import QAction, QKeySequence
    from PySide6.QtWidgets import QDialog, QTextBrowser

    from fewshot_studio.gui import actions

    w = shown_window(qtbot)
    late = QAction("Zap the images", w, shortcut=QKeySequence("Ctrl+Alt+Z"))
    w.addAction(late)  # added after the menus were built: listed all the same

    def dialog_text() -> str:
        help_menu = next(a.menu() for a in w.menuBar().actions() if a.text() == "&Help")
        next(a for a in help_menu.actions() if "Keyboard" in a.text()).trigger()
        dlg = next(d for d in w.findChildren(QDialog) if d.isVisible()
                   and d.windowTitle() == "Keyboard shortcuts")
        text = dlg.findChild(QTextBrowser).toPlainText()
        dlg.close()
        return text

    text = dialog_text()
    with_keys = [a for a in w.findChildren(QAction) if actions.key_text(a)]
    assert len(with_keys) >= 20
    for a in with_keys:
        assert actions.key_text(a) in text and actions.menu_text(a) in text, a.text()
    rows = actions.shortcut_rows(w)
    for row in (("Ctrl+M", "View > Embedding map"),
                ("Ctrl+Shift+F", "Review > Find similar"),
                ("Ctrl+Shift+L", "Review > Label N most similar as…"),
                ("Ctrl+D", "Review > Find duplicates"),
                ("Ctrl+Shift+D", "Review > Keep one, mark the rest"),
                ("Ctrl+I", "File > Import labels > From a CSV file…"),
                ("Ctrl+Shift+I", "File > Import labels > From class folders…"),
                ("Ctrl+Shift+Z / Ctrl+Y", "Edit > Redo"),
                ("Ctrl+Alt+Z", "Zap the images")):
        assert row in rows, row
    assert "1 – 9" in text and "Delete / Backspace" in text  # the gallery's own keys
    late.setShortcut(QKeySequence("Ctrl+Alt+Q"))  # changed: the dialog follows
    assert "Ctrl+Alt+Q" in dialog_text()
    w.close()


def test_a_reopened_project_shows_its_map_without_a_run(qtbot, labeled_win,
                                                        tmp_path: Path) -> None:
    from _gui_helpers import shown_window

    a = labeled_win
    shown = sorted(map(str, _open_map(qtbot, a).paths))
    labeled = a.gallery_model.labeled_count()
    saved = a.project.save(tmp_path / "proj" / "mine")
    a.close()
    b = shown_window(qtbot)
    with qtbot.waitSignal(b.labeling.scanned, timeout=20_000):
        b.project.open(saved)
    assert b.gallery_model.labeled_count() == labeled  # the saved labels, no Label press
    b.labeling.set_cache_path(tmp_path / "cache.sqlite")  # where the first window's run put them
    ctl = _open_map(qtbot, b)
    assert sorted(map(str, ctl.paths)) == shown
    assert b.labeling.host.session is None  # read from the cache: the engine never ran
    b.close()
