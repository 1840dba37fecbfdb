"""Project files from untrusted sources (issue 12, defect 12): wrong structure or types,
deep nesting, special and huge files give a one-line UserError naming the file, never a
RecursionError, TypeError or KeyError; a large project loads quickly. Qt-free."""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path

import pytest

from fewshot_studio.engine.api import LabelSettings, Prediction, Status
from fewshot_studio.errors import UserError
from fewshot_studio.gui import project_io as pio
from fewshot_studio.gui import saved_predictions as sp

FMT = {"format": pio.FORMAT}
PRED = {"format": sp.PREDICTIONS_FORMAT, "checkpoint_id": "ab12", "labels": ["A", "B"],
        "path": ["q/1.png", "q/2.png"], "label": [0, None], "confidence": [0.9, 0.4],
        "margin": [0.8, 0.1], "status": ["ok", "unknown"], "top": [[0, 0.9, 1, 0.1], []],
        "error": {}, "size": [10, 20], "mtime": [100, 200]}


def _write(tmp_path: Path, doc: object, name: str = "p.fsproj") -> Path:
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


@pytest.mark.parametrize(("doc", "expected"), [
    ({**FMT, "classes": "abc"}, "'classes' must be a list, not str"),
    ({**FMT, "classes": [{"color": "#000000"}]}, "class 1 has no name"),
    ({**FMT, "classes": [{"name": ""}]}, "class 1 has no name"),
    ({**FMT, "classes": ["A"]}, "class 1 must be an object, not str"),
    ({**FMT, "classes": [{"name": 5}]}, "class 1 has no name"),
    ({**FMT, "classes": [{"name": "A", "examples": "a.png"}]},
     "class 'A': 'examples' must be a list, not str"),
    ({**FMT, "classes": [{"name": "A", "examples": [1]}]}, "'examples' must be a list of paths"),
    ({**FMT, "classes": [{"name": "A", "color": 3}]}, "class 'A': 'color' must be text"),
    ({**FMT, "classes": [{"name": "A"}, {"name": "A"}]}, "class 'A' appears twice"),
    ({**FMT, "settings": [1, 2]}, "'settings' must be an object, not list"),
    ({**FMT, "settings": {"batch_size": "64"}}, "setting 'batch_size' must be an integer"),
    ({**FMT, "settings": {"transductive": 1}}, "setting 'transductive' must be true or false"),
    ({**FMT, "settings": {"unknown_threshold": "NaN"}}, "'unknown_threshold' must be a finite"),
    ('{"format": "fewshot-studio-project/1", "settings": {"unknown_threshold": NaN}}',
     "'unknown_threshold' must be a finite number"),
    ({**FMT, "corrections": ["a.png"]}, "'corrections' must be an object, not list"),
    ({**FMT, "corrections": {"a.png": 3}}, "'corrections' must map paths to class names"),
    ({**FMT, "query_folder": 7}, "'query_folder' must be a path, not int"),
    ({**FMT, "checkpoint": None}, "'checkpoint' must be text, not NoneType"),
    ({**FMT, "reviewed": ["a.png"]}, "'reviewed' must be an object, not list"),
    ({**FMT, "reviewed": {"a.png": 1}}, "'reviewed' must map paths to class names or null"),
    ({**FMT, "predictions": [1]}, "predictions must be an object, not list"),
    ({**FMT, "predictions": {"format": "other-tool/3", "path": []}},
     "predictions: unknown format 'other-tool/3'"),
    ({**FMT, "predictions": {**PRED, "path": "a.png"}}, "predictions: 'path' must be a list"),
    ({**FMT, "predictions": {k: v for k, v in PRED.items() if k != "margin"}},
     "predictions: 'margin' must be a list, not NoneType"),
    ({**FMT, "predictions": {**PRED, "confidence": [0.5]}},
     "predictions: 'confidence' has 1 entries for 2 paths"),
    ({**FMT, "predictions": {**PRED, "label": [0, 5]}},
     "predictions: 'label' must hold label indexes below 2 or null, not 5"),
    ({**FMT, "predictions": {**PRED, "label": [0, True]}}, "'label' must hold label indexes"),
    ({**FMT, "predictions": {**PRED, "status": ["ok", "maybe"]}},
     "predictions: 'status' must hold 'ok', 'unknown' or 'error', not 'maybe'"),
    ({**FMT, "predictions": {**PRED, "status": ["ok", ["ok"]]}}, "'status' must hold"),
    ({**FMT, "predictions": {**PRED, "confidence": [0.5, "high"]}},
     "predictions: 'confidence' must hold finite numbers, not 'high'"),
    ('{"format": "fewshot-studio-project/1", "predictions": {"format": '
     '"fewshot-studio-predictions/1", "path": ["a"], "label": [null], "confidence": [NaN], '
     '"margin": [0], "status": ["ok"], "top": [[]], "size": [1], "mtime": [1]}}',
     "'confidence' must hold finite numbers, not nan"),
    ({**FMT, "predictions": {**PRED, "top": [[0, 0.9, 1], []]}}, "'top' must hold [label"),
    ({**FMT, "predictions": {**PRED, "top": [[0, 0.9], [9, 0.1]]}}, "'top' must hold [label"),
    ({**FMT, "predictions": {**PRED, "size": [1, 2.5]}}, "'size' must hold integers, not 2.5"),
    ({**FMT, "predictions": {**PRED, "checkpoint_id": 7}}, "'checkpoint_id' must be text"),
    ({**FMT, "predictions": {**PRED, "labels": [1, 2]}}, "'labels' must be a list of class"),
    ({**FMT, "predictions": {**PRED, "error": {"7": "x"}}},
     "'error' must map row numbers to reasons, not '7'"),
    ({"format": ["x"]}, "not a FewShot Studio project (format ['x'])"),
    ([1, 2], "not a FewShot Studio project (not a JSON object)"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"a": ' * 100_000 + "1" + "}" * 100_000, "nested too deeply"),
])
def test_project_bad_structure_gives_one_line_user_error(tmp_path: Path, doc: object,
                                                         expected: str) -> None:
    path = _write(tmp_path, doc)
    with pytest.raises(UserError) as e:
        pio.load_project(path)
    msg = str(e.value)
    assert expected in msg and str(path) in msg and "\n" not in msg, msg


def test_project_settings_rule(tmp_path: Path) -> None:
    """Unknown settings are ignored (a newer version's); known ones keep their type; an
    integer is accepted for a number."""
    path = _write(tmp_path, {**FMT, "settings": {"unknown_threshold": 1, "future_knob": [1],
                                                  "batch_size": 8, "device": "cpu"}})
    s = pio.load_project(path).settings
    assert s == LabelSettings(unknown_threshold=1.0, batch_size=8, device="cpu")
    assert isinstance(s.unknown_threshold, float)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_project_special_and_huge_files_are_refused_before_reading(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.fsproj"
    os.mkfifo(fifo)  # opening it would block forever
    with pytest.raises(UserError, match=r"cannot read the project .*pipe\.fsproj: not a regular"):
        pio.load_project(fifo)
    huge = tmp_path / "huge.fsproj"
    with open(huge, "wb") as f:
        f.truncate(pio.MAX_PROJECT_BYTES + 1)  # sparse: no disk used
    t0 = time.perf_counter()
    with pytest.raises(UserError, match=r"huge\.fsproj: file too large \(200 MB"):
        pio.load_project(huge)
    assert time.perf_counter() - t0 < 0.5
    with pytest.raises(UserError, match=r"^no project file .*missing\.fsproj$"):
        pio.load_project(tmp_path / "missing.fsproj")
    bad_recovery = _write(tmp_path, {**FMT, "classes": {"a": 1}}, "rec.fsproj")
    with pytest.raises(UserError, match=r"^recovery file .*rec\.fsproj: 'classes' must be"):
        pio.load_autosave(bad_recovery)
    store = _write(tmp_path, "[" * 100_000 + "]" * 100_000, "recent.json")
    assert pio.RecentProjects(store).list() == []
    store.write_text('{"a": 1}')
    assert pio.RecentProjects(store).list() == []


def test_project_paths_are_normalised_without_system_calls(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    n = 20_000
    doc = {**FMT, "classes": [{"name": "A", "examples": [f"ex/../ex/{i}.png" for i in range(n)]}],
           "query_folder": "q", "corrections": {f"q/./{i}.jpg": "A" for i in range(n)}}
    path = _write(tmp_path, doc)
    calls = []
    real_stat = os.stat
    monkeypatch.setattr(os, "stat", lambda *a, **k: calls.append(a) or real_stat(*a, **k))
    monkeypatch.setattr(os, "lstat", lambda *a, **k: calls.append(a) or real_stat(*a, **k))
    t0 = time.perf_counter()
    p = pio.load_project(path)
    elapsed = time.perf_counter() - t0
    base = path.resolve().parent
    assert p.classes[0].examples[7] == base / "ex" / "7.png"
    assert p.corrections[base / "q" / "7.jpg"] == "A" and len(p.corrections) == n
    assert len(calls) < 20, len(calls)  # not one per path
    assert elapsed < 2.0


def test_predictions_round_trip_in_columns(tmp_path: Path) -> None:
    """Predictions, review marks and file stamps come back as saved; the file holds one line
    per column (compact for big folders), paths relative to the project; 100,000 predictions
    load in a few seconds at most."""
    base = tmp_path / "proj"
    n = 100_000
    preds = [Prediction(base / "q" / f"{i:06d}.jpg", None if i % 7 == 0 else "cat", 0.5 + i / 4e5,
                        0.25, Status.UNKNOWN if i % 7 == 0 else Status.OK,
                        (("cat", 0.75), ("dog", 0.25)), "bad file" if i % 1000 == 1 else "")
             for i in range(n)]
    stamps = [(1000 + i, 1_700_000_000 + i) for i in range(n)]
    corrections = {preds[3].path: "cat"}
    classes = [pio.ClassSpec("cat", "#000000"), pio.ClassSpec("dog", "#111111")]
    project = pio.Project(classes=classes, query_folder=base / "q", corrections=corrections,
                          reviewed={preds[2].path: "cat", preds[0].path: None},
                          predictions=sp.SavedPredictions("feed" * 16, preds, stamps))
    path = pio.save_project(project, base / "p.fsproj").path
    text = path.read_text()
    assert len(text.splitlines()) < 60 and len(text) < 80 * n  # about 70 bytes an image
    assert '"path": ["q/000000.jpg","q/000001.jpg"' in text
    t0 = time.perf_counter()
    back = pio.load_project(path)
    elapsed = time.perf_counter() - t0
    got = back.predictions
    assert got is not None and got.checkpoint_id == "feed" * 16 and got.stamps == stamps
    assert got.predictions[3].corrected and not got.predictions[4].corrected
    assert [replace(p, corrected=False) for p in got.predictions] == [
        replace(p, confidence=round(p.confidence, 6)) for p in preds]
    assert back.reviewed == project.reviewed and back.corrections == corrections
    assert elapsed < 5.0, elapsed


def test_cache_beside_a_project_only_if_it_is_there(tmp_path: Path) -> None:
    """Saving never creates a cache beside the project; an older project's cache there is
    used when it exists; the stamp rule tolerates 2 s of time."""
    path = pio.save_project(pio.Project(checkpoint="x"), tmp_path / "p.fsproj").path
    assert sorted(os.listdir(tmp_path)) == ["p.fsproj"]
    assert pio.cache_path_for(path) is None
    legacy = tmp_path / "p.embeddings.sqlite"
    legacy.write_bytes(b"")
    assert pio.cache_path_for(path) == legacy
    assert sp.stamp_matches((5, 100), (5, 102)) and not sp.stamp_matches((5, 100), (5, 103))
    assert not sp.stamp_matches((5, 100), (6, 100))
    assert not sp.stamp_matches(sp.NO_STAMP, sp.NO_STAMP)
    assert sp.file_stamp(tmp_path / "missing.png") == sp.NO_STAMP
