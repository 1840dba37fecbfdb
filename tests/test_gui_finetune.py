"""Label > Fine-tune on my examples (issue 17): the toggle sends ``adapt="finetune"`` to the
session in the engine thread and labels again, the progress bar shows the fine-tuning phase,
Cancel stops it while the window keeps answering, a project keeps the setting, and the toggle
is disabled (its tip saying why) for a checkpoint that cannot be fine-tuned.

A fake session fine-tunes slowly (a step every 20 ms, cancelled by closing its run); one
test runs the real engine on a tiny random-init ProtoNet checkpoint (which can be
fine-tuned) and one opens a tiny MAML checkpoint (which cannot)."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import ClassVar

import pytest

pytest.importorskip("pytestqt")

from _gui_helpers import (
    FakeSession,
    make_dataset,
    red_green_images,
    shown_window,
    tiny_checkpoint,
)
from _gui_helpers import label_and_wait as _label
from _gui_helpers import wait_idle as _idle
from PySide6.QtCore import QThreadPool

from fewshot_studio.engine.api import LabelSettings, Prediction, Status
from fewshot_studio.gui import actions
from fewshot_studio.gui import project_io as pio
from fewshot_studio.gui.controllers.run_progress import FINETUNING
from fewshot_studio.gui.main_window import MainWindow
from fewshot_studio.progress import Progress

CLASSES = ["red", "green"]
N = 4
STEPS = 150  # x 20 ms: 3 s of fine-tuning, unless cancelled


class TuneSession(FakeSession):
    """Every image is "red", at 0.9 with the fine-tuned model and 0.6 without. ``run`` with
    ``adapt="finetune"`` first fine-tunes: ``STEPS`` progress items 20 ms apart. Records the
    thread and the ``adapt`` of each run, and runs closed while fine-tuning."""

    runs: ClassVar[list[tuple[int, str]]] = []
    closed: ClassVar[list[int]] = []  # the step a cancelled run stopped at

    def guess(self, index: int, path: Path) -> Prediction:
        p = 0.9 if self.settings.adapt == "finetune" else 0.6
        return Prediction(path, "red", p, p - 0.2, Status.OK, (("red", p),))

    def run(self, paths: list[Path]):
        TuneSession.runs.append((threading.get_ident(), self.settings.adapt))
        if self.settings.adapt == "finetune":
            step = 0
            try:
                for step in range(1, STEPS + 1):
                    time.sleep(0.02)
                    yield Progress(step, STEPS, FINETUNING)
            except GeneratorExit:
                TuneSession.closed.append(step)
                raise
        yield from super().run(paths)


@pytest.fixture
def images(tmp_path: Path) -> dict:
    return red_green_images(tmp_path, N)


def _project(images: dict, checkpoint: str) -> pio.Project:
    return pio.Project(classes=[pio.ClassSpec(n, pio.PALETTE[i], images["support"][n])
                                for i, n in enumerate(CLASSES)],
                       query_folder=images["query"], checkpoint=checkpoint)


@pytest.fixture
def win(qtbot, images: dict) -> MainWindow:
    TuneSession.runs, TuneSession.closed = [], []
    w = shown_window(qtbot, session_factory=TuneSession)
    w.project.apply(_project(images, "fake"))
    qtbot.waitUntil(lambda: w.gallery_model.rowCount() == N, timeout=10_000)
    yield w
    w.close()
    QThreadPool.globalInstance().waitForDone(20_000)  # the checkpoint checks


def _confidences(w: MainWindow) -> set[float]:
    return {p.confidence for p in w.gallery_model.predictions()}


def test_toggle_fine_tunes_off_the_ui_thread_shows_the_phase_and_relabels(
        qtbot, win: MainWindow) -> None:
    act = win.acts.finetune
    assert act.isCheckable() and not act.isChecked() and act.isEnabled()
    assert act in win.menuBar().actions()[2].menu().actions()  # the Label menu
    assert win.labeling.settings.adapt == "auto" == LabelSettings().adapt
    _label(qtbot, win)
    assert [a for _, a in TuneSession.runs] == ["auto"] and _confidences(win) == {0.6}

    seen: list[tuple[int, int, str]] = []
    win.labeling.progress.connect(lambda d, t, text: seen.append((d, t, text)))
    with qtbot.waitSignal(win.labeling.run_finished, timeout=30_000):
        act.trigger()  # labeled images: a new run starts by itself, no Label press
        assert win.labeling.busy
        qtbot.waitUntil(lambda: win.progress.maximum() == STEPS, timeout=10_000)
        assert win.progress.isVisible() and win.progress.value() >= 1
        assert win.progress_text.text().startswith("Fine-tuning on your examples…")
    _idle(qtbot, win)
    assert act.isChecked() and win.labeling.settings.adapt == "finetune"
    assert [a for _, a in TuneSession.runs] == ["auto", "finetune"]
    main = threading.main_thread().ident
    assert all(t != main for t, _ in TuneSession.runs)
    assert _confidences(win) == {0.9}  # relabeled by the fine-tuned model
    assert (STEPS, STEPS, f"Fine-tuning on your examples… {STEPS}/{STEPS}") in seen
    assert win.project.dirty

    with qtbot.waitSignal(win.labeling.run_finished, timeout=30_000):
        act.trigger()  # off: the checkpoint's own model labels again (no fine-tuning)
    _idle(qtbot, win)
    assert not act.isChecked() and win.labeling.settings.adapt == "auto"
    assert [a for _, a in TuneSession.runs] == ["auto", "finetune", "auto"]
    assert _confidences(win) == {0.6}


def test_cancel_stops_fine_tuning_and_the_window_stays_responsive(
        qtbot, win: MainWindow) -> None:
    _label(qtbot, win)
    ticks: list[float] = []
    timer = win.startTimer(10)
    win.timerEvent = lambda _e: ticks.append(time.perf_counter())
    try:
        win.acts.finetune.trigger()
        qtbot.waitUntil(lambda: win.progress.maximum() == STEPS and win.progress.value() >= 5,
                        timeout=10_000)
        assert win.cancel_button.isVisible() and win.acts.cancel.isEnabled()
        n = len(ticks)
        qtbot.wait(200)  # the UI thread keeps running its event loop while it fine-tunes
        assert len(ticks) - n >= 5
        t0 = time.perf_counter()
        with qtbot.waitSignal(win.labeling.run_cancelled, timeout=5_000):
            win.cancel_button.click()
        _idle(qtbot, win)
    finally:
        win.killTimer(timer)
    assert time.perf_counter() - t0 < 2.0
    assert len(TuneSession.closed) == 1 and 5 <= TuneSession.closed[0] < STEPS
    assert not win.labeling.busy and win.acts.label.isEnabled()
    assert [a for _, a in TuneSession.runs] == ["auto", "finetune"]  # not restarted
    assert win.acts.finetune.isChecked()  # the setting stays: the next Label fine-tunes


def test_toggling_during_a_run_cancels_it_and_labels_again(qtbot, win: MainWindow) -> None:
    win.acts.finetune.trigger()  # nothing labeled yet: no run
    _idle(qtbot, win)
    assert not TuneSession.runs
    win.labeling.label()
    qtbot.waitUntil(lambda: win.progress.value() >= 2, timeout=10_000)
    with qtbot.waitSignal(win.labeling.run_finished, timeout=30_000):
        win.acts.finetune.trigger()  # off while fine-tuning: that run stops, one without
    _idle(qtbot, win)
    assert [a for _, a in TuneSession.runs] == ["finetune", "auto"]
    assert len(TuneSession.closed) == 1 and _confidences(win) == {0.6}


def test_fine_tune_setting_survives_save_and_reopen(qtbot, win: MainWindow,
                                                    tmp_path: Path) -> None:
    win.acts.finetune.trigger()
    saved = win.project.save(tmp_path / "proj" / "tune")
    doc = json.loads(saved.read_text())
    assert doc["settings"]["adapt"] == "finetune"
    assert pio.load_project(saved).settings.adapt == "finetune"
    del doc["settings"]["adapt"]  # a project saved before the toggle existed: off
    old = tmp_path / "old.fsproj"
    old.write_text(json.dumps(doc))
    assert pio.load_project(old).settings.adapt == "auto"

    win.project.new()
    assert not win.acts.finetune.isChecked() and win.labeling.settings.adapt == "auto"
    with qtbot.waitSignal(win.labeling.scanned, timeout=20_000):
        win.project.open(saved)
    qtbot.waitUntil(lambda: win.gallery_model.rowCount() == N, timeout=5_000)
    assert win.acts.finetune.isChecked() and win.labeling.settings.adapt == "finetune"
    assert not win.project.dirty
    _label(qtbot, win)
    assert TuneSession.runs[-1][1] == "finetune" and _confidences(win) == {0.9}

    with qtbot.waitSignal(win.labeling.scanned, timeout=20_000):
        win.project.open(old)
    assert not win.acts.finetune.isChecked() and win.labeling.settings.adapt == "auto"


def test_real_session_fine_tunes_the_tiny_checkpoint(qtbot, tmp_path: Path) -> None:
    """The engine's own session: the toggle labels every image with a fine-tuned copy (its
    features cached under their own id), and the checkpoint file is left as it was."""
    ckpt = tiny_checkpoint(tmp_path / "tiny.safetensors")
    original = ckpt.read_bytes()
    support, query = make_dataset(tmp_path / "data", n_support=2, n_query=2)
    w = shown_window(qtbot)
    try:
        w.labeling.set_cache_path(tmp_path / "cache.sqlite")
        with qtbot.waitSignal(w.labeling.finetune_checked, timeout=20_000,
                              check_params_cb=lambda name, _why: name == str(ckpt)) as sig:
            w.project.apply(pio.Project(
                classes=[pio.ClassSpec(n, pio.PALETTE[i], ps)
                         for i, (n, ps) in enumerate(support.items())],
                query_folder=query, checkpoint=str(ckpt)))
        assert sig.args == [str(ckpt), ""] and w.acts.finetune.isEnabled()
        qtbot.waitUntil(lambda: w.gallery_model.rowCount() == 6, timeout=10_000)
        assert w.acts.finetune.toolTip() == actions.FINETUNE_TIP
        _label(qtbot, w)
        plain = w.labeling.feature_id
        phases: list[str] = []
        w.labeling.progress.connect(lambda d, t, text: phases.append(text))
        with qtbot.waitSignal(w.labeling.run_finished, timeout=120_000):
            w.acts.finetune.trigger()
        _idle(qtbot, w)
        assert any(t.startswith("Fine-tuning on your examples…") for t in phases)
        assert w.labeling.host.session.settings.adapt == "finetune"
        assert "-ft" in w.labeling.feature_id and w.labeling.feature_id != plain
        preds = w.gallery_model.predictions()
        assert len(preds) == 6 and all(p.status != Status.ERROR for p in preds)
        assert ckpt.read_bytes() == original
    finally:
        w.labeling.shutdown()
        w.close()
        QThreadPool.globalInstance().waitForDone(20_000)


def test_toggle_is_disabled_for_a_checkpoint_that_cannot_be_fine_tuned(
        qtbot, win: MainWindow, images: dict, tmp_path: Path) -> None:
    from maml_fixtures import small_maml

    from fewshot_studio.data.preprocess import Preprocess
    from fewshot_studio.io.checkpoint import Checkpoint, save_checkpoint
    from fewshot_studio.models import model_spec
    from fewshot_studio.models.finetune import can_finetune

    maml = small_maml().float()
    assert not can_finetune(maml)
    path = save_checkpoint(tmp_path / "maml.safetensors", Checkpoint(
        model=model_spec(maml, "conv4", maml.backbone.config()),
        preprocess=Preprocess(image_size=14, channels=1, mean=(0.5,), std=(0.5,)),
        state_dict=maml.state_dict(), name="maml"))
    act = win.acts.finetune
    act.trigger()  # on with the fake checkpoint, which the check cannot read: left alone
    assert act.isChecked() and act.isEnabled()
    with qtbot.waitSignal(win.labeling.finetune_checked, timeout=20_000,
                          check_params_cb=lambda name, _why: name == str(path)) as sig:
        win.commands.set_checkpoint(str(path))
    assert sig.args[0] == str(path) and "maml" in sig.args[1]
    qtbot.waitUntil(lambda: not act.isEnabled(), timeout=5_000)
    assert not act.isChecked()  # and switched off
    assert win.labeling.settings.adapt == "auto"
    assert act.toolTip() == sig.args[1] == act.statusTip()
    assert "only ProtoNet and Relation Network checkpoints" in act.toolTip()
    assert win.menuBar().actions()[2].menu().toolTipsVisible()
    # a project with the setting on, for the same checkpoint: still disabled, and off
    win.project.apply(replace(_project(images, str(path)),
                              settings=LabelSettings(adapt="finetune")))
    assert not act.isEnabled() and not act.isChecked()
    assert win.labeling.settings.adapt == "auto"

    tiny = str(tiny_checkpoint(tmp_path / "tiny.safetensors"))
    with qtbot.waitSignal(win.labeling.finetune_checked, timeout=20_000,
                          check_params_cb=lambda name, _why: name == tiny) as sig:
        win.commands.set_checkpoint(tiny)
    assert sig.args[1] == ""
    qtbot.waitUntil(act.isEnabled, timeout=5_000)  # the window's slot may come after ours
    assert act.toolTip() == actions.FINETUNE_TIP and not act.isChecked()
