"""Projects keep everything (issue 13): predictions, review marks and corrections come back on
reopen with no engine call and no Label press; the next run reads every feature from the same
cache (embeds 0); saving writes nothing but the project file; saved labels of another
checkpoint or of changed files are not shown; ``label --save-project`` writes a project the
app opens with the CSV's labels; ``fewshot-studio P.fsproj`` opens it."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("pytestqt")

from _gui_helpers import make_dataset, make_image, shown_window, tiny_checkpoint
from PySide6.QtCore import QItemSelectionModel

from fewshot_studio import paths as app_paths
from fewshot_studio.engine.api import LabelSettings, Prediction, Status
from fewshot_studio.gui import project_io as pio
from fewshot_studio.gui import saved_predictions as sp
from fewshot_studio.gui.controllers.session_host import default_factory
from fewshot_studio.gui.main_window import MainWindow

N_QUERY = 4  # per class, 3 classes
REPO = Path(__file__).resolve().parents[1]


class CountingFactory:
    """The real engine, counting the sessions made (an engine call) and keeping them."""

    def __init__(self) -> None:
        self.sessions: list[Any] = []

    def __call__(self, checkpoint: str, settings: LabelSettings, cache_path: Path | None) -> Any:
        s = default_factory(checkpoint, settings, cache_path)
        self.sessions.append(s)
        return s


def _refuse(*_a: object) -> Any:
    raise AssertionError("the engine was started")


@pytest.fixture
def data(tmp_path: Path) -> dict:
    ckpt = tiny_checkpoint(tmp_path / "tiny.safetensors")
    support, query = make_dataset(tmp_path / "ds", n_support=2, n_query=N_QUERY)
    return {"ckpt": ckpt, "support": support, "query": query.resolve(), "root": tmp_path}


def _project(data: dict) -> pio.Project:
    return pio.Project(classes=[pio.ClassSpec(n, pio.PALETTE[i], list(ps))
                                for i, (n, ps) in enumerate(sorted(data["support"].items()))],
                       query_folder=data["query"], checkpoint=str(data["ckpt"]),
                       settings=LabelSettings(unknown_threshold=0.0))


def _label(qtbot, w: MainWindow) -> dict:
    with qtbot.waitSignal(w.labeling.run_finished, timeout=60_000) as sig:
        assert w.labeling.label() is not None
    return sig.args[0]


def _idle(qtbot, w: MainWindow) -> None:
    qtbot.waitUntil(lambda: w.labeling.pool.activeThreadCount() == 0 and not w.labeling.busy,
                    timeout=30_000)
    qtbot.wait(50)


def _shown(w: MainWindow) -> dict[Path, tuple]:
    return {p.path: (p.label, p.status, round(p.confidence, 4), p.corrected, p.error,
                     tuple(lab for lab, _ in p.top))
            for p in w.gallery_model.predictions()}


def _open(qtbot, w: MainWindow, path: Path, n: int) -> None:
    with qtbot.waitSignal(w.labeling.scanned, timeout=20_000):
        w.project.open(path)
    qtbot.waitUntil(lambda: w.gallery_model.rowCount() == n, timeout=5_000)


def test_reopen_shows_labels_and_review_state_then_relabels_from_the_cache(
        qtbot, data: dict, tmp_path: Path) -> None:
    n = 3 * N_QUERY
    a = shown_window(qtbot, session_factory=CountingFactory())
    a.project.apply(_project(data))
    qtbot.waitUntil(lambda: a.gallery_model.rowCount() == n, timeout=10_000)
    _label(qtbot, a)
    assert a.labeling.host.session.counters.embedded >= n  # fresh images: embedded once
    target = data["query"] / "red_0000.png"
    a.correct_paths([target], 0)  # first class in sorted order: blue
    _idle(qtbot, a)
    other = data["query"] / "green_0001.png"
    sel = a.gallery.selectionModel()
    sel.select(a.proxy.mapFromSource(a.gallery_model.index(a.gallery_model.row_of(other))),
               QItemSelectionModel.SelectionFlag.ClearAndSelect)
    a.reviewing.accept_selected()
    before, marks = _shown(a), a.labeling.review_marks()
    reviewed = a.labeling.reviewed_paths()
    assert before[target][0] == "blue" and before[target][3]
    assert {target, other} <= reviewed and len(before) == n
    proj = tmp_path / "proj"
    saved = a.project.save(proj / "mine")
    assert sorted(os.listdir(proj)) == ["mine.fsproj"]  # no cache, no onnx/ beside it
    assert a.labeling.cache_path is None  # the user cache directory's, not moved
    assert list((app_paths.user_cache_dir() / "onnx").glob("*.onnx"))
    a.close()

    factory = CountingFactory()
    b = shown_window(qtbot, session_factory=factory)
    _open(qtbot, b, saved, n)
    assert b.gallery_model.labeled_count() == n  # at once: no Label press
    assert not factory.sessions and not b.labeling.busy  # no engine
    assert _shown(b) == before
    assert b.labeling.review_marks() == marks and b.labeling.reviewed_paths() == reviewed
    qtbot.waitUntil(lambda: b.review_count.text() == f"reviewed {len(reviewed)} / {n}",
                    timeout=2_000)
    assert not b.project.dirty
    # a correction runs the engine in the background: every feature from the cache
    b.correct_paths([data["query"] / "blue_0002.png"], 1)
    qtbot.waitUntil(lambda: bool(factory.sessions), timeout=5_000)
    _idle(qtbot, b)
    session = b.labeling.host.session
    assert session.counters.embedded == 0 and session.counters.cache_hits >= n
    assert session.corrections() == {target: "blue", data["query"] / "blue_0002.png": "green"}
    _label(qtbot, b)  # and so does Label
    assert session.counters.embedded == 0
    assert sorted(os.listdir(proj)) == ["mine.fsproj"]
    b.close()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_saved_labels_of_changed_files_or_another_checkpoint_are_not_shown(
        qtbot, data: dict, tmp_path: Path) -> None:
    paths = sorted(data["query"].glob("*.png"))
    preds = [Prediction(p, "red", 0.9, 0.5, Status.OK, (("red", 0.9), ("blue", 0.1)))
             for p in paths]
    project = _project(data)
    project.predictions = sp.SavedPredictions(
        _sha256(data["ckpt"]), preds, [sp.file_stamp(p) for p in paths])
    project.reviewed = {paths[0]: "red"}
    saved = pio.save_project(project, tmp_path / "p.fsproj").path
    changed = make_image(paths[1], (1, 2, 3), 7, size=40)  # edited since: another size
    new_file = make_image(data["query"] / "zz_new.png", (9, 9, 9), 8)
    w = shown_window(qtbot, session_factory=_refuse)
    messages: list[str] = []
    w.labeling.restored.connect(lambda k, m: messages.append(m))
    _open(qtbot, w, saved, len(paths) + 1)
    shown = {p.path for p in w.gallery_model.predictions()}
    assert shown == set(paths) - {changed} and new_file not in shown
    assert "Restored 11 saved labels; 1 not shown" in messages[-1]
    assert w.labeling.reviewed_paths() == {paths[0]}

    doc = json.loads(saved.read_text())
    doc["predictions"]["checkpoint_id"] = "0" * 64  # made by another checkpoint
    saved.write_text(json.dumps(doc))
    _open(qtbot, w, saved, len(paths) + 1)
    assert w.gallery_model.labeled_count() == 0
    assert "made with another checkpoint" in messages[-1]
    assert w.project.snapshot().predictions is None
    w.close()


def test_cli_save_project_opens_in_the_app_with_the_csv_labels(
        qtbot, data: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fewshot_studio.cli import main
    from fewshot_studio.engine.export import read_csv

    out, proj = tmp_path / "labels.csv", tmp_path / "review" / "batch"
    assert main(["label", "--checkpoint", str(data["ckpt"]),
                 "--support", str(data["root"] / "ds" / "support"),
                 "--query", str(data["query"]), "--out", str(out),
                 "--unknown-threshold", "0.5", "--save-project", str(proj)]) == 0
    saved = proj.with_suffix(".fsproj")
    assert f"project {saved}" in capsys.readouterr().out
    assert sorted(os.listdir(saved.parent)) == ["batch.fsproj"]
    rows = {r["path"]: r for r in read_csv(out)}
    w = shown_window(qtbot, session_factory=_refuse)
    _open(qtbot, w, saved, len(rows))
    lab = w.labeling
    assert [c.name for c in w.project.snapshot().classes] == ["blue", "green", "red"]
    assert lab.query_folder == data["query"] and lab.checkpoint == str(data["ckpt"])
    assert lab.settings.unknown_threshold == 0.5
    preds = w.gallery_model.predictions()
    assert len(preds) == len(rows)
    for p in preds:
        r = rows[p.path.relative_to(data["query"]).as_posix()]
        assert (p.label or "", str(p.status)) == (r["label"], r["status"])
        assert p.confidence == pytest.approx(float(r["confidence"]), abs=1e-4)
    w.close()


def test_project_file_as_the_positional_argument(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from fewshot_studio import cli
    from fewshot_studio.gui import app as gui_app

    assert cli.parse_args(["x.fsproj"]).project == "x.fsproj"
    assert cli.parse_args(["--open", "y.fsproj"]).project == "y.fsproj"
    other = tmp_path / "no-suffix"
    other.write_text("{}")
    args = cli.parse_args(["--demo", str(other)])
    assert args.project == str(other) and args.demo and args.command is None
    assert cli.parse_args(["checkpoints"]).command == "checkpoints"
    with pytest.raises(SystemExit):
        cli.parse_args(["no-such-command"])
    seen: list[argparse.Namespace] = []
    monkeypatch.setattr(gui_app, "run_app", lambda a: seen.append(a) or 0)
    assert cli.main([str(tmp_path / "p.fsproj")]) == 0
    assert seen[0].project == str(tmp_path / "p.fsproj") and seen[0].command is None


def test_desktop_entry_opens_project_files() -> None:
    entry = (REPO / "packaging" / "fewshot-studio.desktop").read_text(encoding="utf-8")
    exec_line = next(x for x in entry.splitlines() if x.startswith("Exec="))
    assert exec_line.endswith(" %f")
    assert "MimeType=application/x-fewshot-studio-project;" in entry
    mime = (REPO / "packaging" / "fewshot-studio-mime.xml").read_text(encoding="utf-8")
    assert 'type="application/x-fewshot-studio-project"' in mime and '"*.fsproj"' in mime
    script = (REPO / "packaging" / "install-desktop-entry.sh").read_text(encoding="utf-8")
    assert "%f" in script and "fewshot-studio-mime.xml" in script
