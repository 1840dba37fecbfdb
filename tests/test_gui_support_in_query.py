"""A support-set folder inside the query folder: its images are class examples, never labeled
(the CLI leaves the --support folder out of the query scan; the app does the same with the
class examples), whether the classes come before the query folder or after it."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import pytest

pytest.importorskip("pytestqt")

from _gui_helpers import FakeSession, label_and_wait, make_image, shown_window

from fewshot_studio.engine.api import Prediction, Status
from fewshot_studio.gui.main_window import MainWindow


class FirstClassSession(FakeSession):
    """Every image gets the first class."""

    runs: ClassVar[list[list[Path]]] = []

    def guess(self, index: int, p: Path) -> Prediction:
        return Prediction(p, self.names[0], 0.9, 0.5, Status.OK, ((self.names[0], 0.9),))

    def run(self, paths: list[Path]):
        FirstClassSession.runs.append(list(paths))
        return super().run(paths)


@pytest.fixture
def tree(tmp_path: Path) -> dict:
    """``query/`` with 4 images of its own and ``query/examples/{red,blue}/`` (2 each)."""
    query = tmp_path / "query"
    own = [make_image(query / f"q{i}.png", (30 * i, 90, 160), i, size=24) for i in range(4)]
    examples = [make_image(query / "examples" / name / f"{name}{i}.png", color, 10 + i, size=24)
                for name, color in (("red", (220, 40, 40)), ("blue", (40, 70, 220)))
                for i in range(2)]
    return {"query": query, "own": {p.resolve() for p in own},
            "examples": {p.resolve() for p in examples}}


@pytest.fixture
def win(qtbot):
    FirstClassSession.runs = []
    w = shown_window(qtbot, session_factory=FirstClassSession)
    w.labeling.set_checkpoint("fake")  # (no file: the fake session needs none)
    yield w
    w.close()


def _import_classes(qtbot, w: MainWindow, folder: Path) -> None:
    w.classes_ctl.import_class_folders([folder])
    qtbot.waitUntil(lambda: sorted(w.classes.names()) == ["blue", "red"], timeout=10_000)


def _shown(w: MainWindow) -> set[Path]:
    return {p.resolve() for p in w.gallery_model.paths()}


def test_classes_first_then_query_folder_leaves_the_examples_out(qtbot, win, tree) -> None:
    _import_classes(qtbot, win, tree["query"] / "examples")
    with qtbot.waitSignal(win.labeling.scanned, timeout=10_000):
        win.commands.set_query_folder(tree["query"])
    assert _shown(win) == tree["own"]  # not the 4 examples under query/examples
    label_and_wait(qtbot, win)
    assert {p.resolve() for p in FirstClassSession.runs[-1]} == tree["own"]
    assert {p.path.resolve() for p in win.gallery_model.predictions()} == tree["own"]


def test_query_folder_first_then_classes_the_examples_are_not_labeled(qtbot, win, tree) -> None:
    with qtbot.waitSignal(win.labeling.scanned, timeout=10_000):
        win.commands.set_query_folder(tree["query"])
    assert _shown(win) == tree["own"] | tree["examples"]  # no classes yet: all 8 are queries
    _import_classes(qtbot, win, tree["query"] / "examples")
    label_and_wait(qtbot, win)
    assert {p.resolve() for p in FirstClassSession.runs[-1]} == tree["own"]
    assert _shown(win) == tree["own"]  # the examples left the gallery
    assert "8 images" not in win.review.counts.text()


def test_examples_are_recognised_through_a_linked_query_folder(qtbot, win, tree) -> None:
    """The examples are stored resolved; the query folder is opened through a symbolic link:
    the scan compares real paths."""
    link = tree["query"].parent / "link"
    link.symlink_to(tree["query"], target_is_directory=True)
    _import_classes(qtbot, win, link / "examples")
    assert all(p in tree["examples"] for ps in win.classes.support().values() for p in ps)
    with qtbot.waitSignal(win.labeling.scanned, timeout=10_000):
        win.commands.set_query_folder(link)
    assert {p.resolve() for p in win.gallery_model.paths()} == tree["own"]
