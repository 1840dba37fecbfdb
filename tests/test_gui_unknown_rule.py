"""Label > Adaptive unknown rule (issue 17): the toggle sends ``unknown_rule="adaptive"`` to
the session in the engine thread and relabels, the toolbar's "Unknown below" slider is
disabled while the rule is read off the examples, and a project keeps the setting.

A fake engine stands in for the model: with the adaptive rule it calls nothing unknown,
with the threshold rule every image below the threshold (all of them at 0.3)."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import ClassVar

import pytest

pytest.importorskip("pytestqt")

from _gui_helpers import FakeSession, red_green_images, shown_window
from _gui_helpers import label_and_wait as _label
from _gui_helpers import wait_idle as _idle

from fewshot_studio.engine.api import LabelSettings, Prediction, Status
from fewshot_studio.gui import project_io as pio
from fewshot_studio.gui.main_window import MainWindow

CLASSES = ["red", "green"]
N = 4


class RuleSession(FakeSession):
    """Every image is "red" at 0.3: unknown under the threshold rule (0.55), labeled under
    the adaptive one. Records the thread and the settings of each ``set_settings``."""

    calls: ClassVar[list[tuple[int, LabelSettings]]] = []
    created: ClassVar[list[LabelSettings]] = []

    def __init__(self, checkpoint: str, settings: LabelSettings,
                 cache_path: Path | None) -> None:
        super().__init__(checkpoint, settings, cache_path)
        RuleSession.created.append(settings)

    def guess(self, index: int, path: Path) -> Prediction:
        if self.settings.unknown_rule == "adaptive":
            return Prediction(path, "red", 0.3, 0.2, Status.OK, (("red", 0.3),))
        return Prediction(path, None, 0.3, 0.2, Status.UNKNOWN, (("red", 0.3),))

    def set_settings(self, settings: LabelSettings) -> list:
        RuleSession.calls.append((threading.get_ident(), settings))
        return super().set_settings(settings)


@pytest.fixture
def images(tmp_path: Path) -> dict:
    return red_green_images(tmp_path, N)


@pytest.fixture
def win(qtbot, images: dict) -> MainWindow:
    RuleSession.calls, RuleSession.created = [], []
    w = shown_window(qtbot, session_factory=RuleSession)
    w.project.apply(pio.Project(
        classes=[pio.ClassSpec(n, pio.PALETTE[i], images["support"][n])
                 for i, n in enumerate(CLASSES)],
        query_folder=images["query"], checkpoint="fake"))
    qtbot.waitUntil(lambda: w.gallery_model.rowCount() == N, timeout=10_000)
    yield w
    w.close()




def _unknown(w: MainWindow) -> int:
    return sum(p.status == Status.UNKNOWN for p in w.gallery_model.predictions())


def _slider_enabled(w: MainWindow) -> bool:
    tb = w.toolbar
    return tb.threshold.isEnabled() and tb.threshold_value.isEnabled()


def test_adaptive_rule_toggle_reaches_the_session_off_the_ui_thread(
        qtbot, win: MainWindow) -> None:
    act = win.acts.adaptive_unknown
    assert act.isCheckable() and not act.isChecked()
    assert act in win.menuBar().actions()[2].menu().actions()  # the Label menu
    assert win.labeling.settings.unknown_rule == "threshold" == LabelSettings().unknown_rule
    assert _slider_enabled(win)
    _label(qtbot, win)
    assert _unknown(win) == N and not RuleSession.calls

    act.trigger()
    _idle(qtbot, win)
    assert act.isChecked() and win.labeling.settings.unknown_rule == "adaptive"
    main = threading.main_thread().ident
    assert [s.unknown_rule for _, s in RuleSession.calls] == ["adaptive"]
    assert all(t != main for t, _ in RuleSession.calls)
    assert win.labeling.host.session.settings.unknown_rule == "adaptive"
    assert _unknown(win) == 0  # relabeled with the new rule, no Label press
    assert not _slider_enabled(win) and not win.toolbar.threshold_caption.isEnabled()
    tip = win.toolbar.threshold.toolTip()
    assert "read off" in tip and "one example a class" in tip
    assert win.project.dirty

    act.trigger()
    _idle(qtbot, win)
    assert not act.isChecked() and win.labeling.settings.unknown_rule == "threshold"
    assert [s.unknown_rule for _, s in RuleSession.calls] == ["adaptive", "threshold"]
    assert all(t != main for t, _ in RuleSession.calls)
    assert _unknown(win) == N
    assert _slider_enabled(win) and "read off" not in win.toolbar.threshold.toolTip()


def test_adaptive_rule_survives_save_and_reopen(qtbot, win: MainWindow,
                                                tmp_path: Path) -> None:
    win.acts.adaptive_unknown.trigger()
    saved = win.project.save(tmp_path / "proj" / "rule")
    doc = json.loads(saved.read_text())
    assert doc["settings"]["unknown_rule"] == "adaptive"
    assert pio.load_project(saved).settings.unknown_rule == "adaptive"

    win.project.new()  # back to the defaults: off, slider on
    assert not win.acts.adaptive_unknown.isChecked() and _slider_enabled(win)
    assert win.labeling.settings.unknown_rule == "threshold"

    RuleSession.created = []
    with qtbot.waitSignal(win.labeling.scanned, timeout=20_000):
        win.project.open(saved)
    qtbot.waitUntil(lambda: win.gallery_model.rowCount() == N, timeout=5_000)
    assert win.acts.adaptive_unknown.isChecked() and not _slider_enabled(win)
    assert win.labeling.settings.unknown_rule == "adaptive"
    assert not win.project.dirty
    _label(qtbot, win)
    assert [s.unknown_rule for s in RuleSession.created] == ["adaptive"]
    assert _unknown(win) == 0
