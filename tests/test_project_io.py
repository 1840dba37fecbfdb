"""Project files from untrusted sources (issue 12, defect 12): wrong structure or types,
deep nesting, special and huge files give a one-line UserError naming the file, never a
RecursionError, TypeError or KeyError; a large project loads quickly. Qt-free."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from fewshot_studio.engine.api import LabelSettings
from fewshot_studio.errors import UserError
from fewshot_studio.gui import project_io as pio

FMT = {"format": pio.FORMAT}


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
