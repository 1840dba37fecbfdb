"""CSV/JSON exports and copying into class folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fewshot_studio.engine import export
from fewshot_studio.engine.api import Prediction, Status
from fewshot_studio.errors import UserError


def _preds(root: Path) -> list[Prediction]:
    top = (("cat", 0.7), ("dog", 0.2), ("bird", 0.1))
    return [
        Prediction(root / "z.jpg", "cat", 0.7, 0.5, Status.OK, top),
        Prediction(root / "a" / "ünï 图.png", None, 0.4, 0.1, Status.UNKNOWN,
                   (("dog", 0.4), ("cat", 0.3), ("bird", 0.3))),
        Prediction(root / "b.jpg", None, 0.0, 0.0, Status.ERROR, (), "truncated file"),
        Prediction(root / "c.jpg", "dog", 1.0, 1.0, Status.OK, top, "", True),
    ]


def test_csv_rows_sorted_relative_utf8(tmp_path: Path) -> None:
    root = tmp_path / "q"
    out = export.write_csv(_preds(root), tmp_path / "labels.csv", root)
    text = out.read_text(encoding="utf-8")
    assert text.splitlines()[0] == ",".join(export.CSV_COLUMNS)
    rows = export.read_csv(out)
    assert [r["path"] for r in rows] == ["a/ünï 图.png", "b.jpg", "c.jpg", "z.jpg"]
    unknown, err, corrected, ok = rows
    assert unknown["status"] == "unknown" and unknown["label"] == ""
    assert unknown["top1"] == "dog" and float(unknown["top1_prob"]) == pytest.approx(0.4)
    assert err["status"] == "error" and err["error"] == "truncated file"
    assert err["confidence"] == "" and err["top1"] == ""
    assert corrected["corrected"] == "true" and corrected["label"] == "dog"
    assert ok["label"] == "cat" and float(ok["margin"]) == pytest.approx(0.5)
    assert ok["corrected"] == "false"
    absolute = export.read_csv(export.write_csv(_preds(root), tmp_path / "abs.csv", root,
                                                absolute_paths=True))
    assert absolute[3]["path"] == str(root / "z.jpg")


def test_json_carries_the_same_fields(tmp_path: Path) -> None:
    root = tmp_path / "q"
    doc = json.loads(export.write_json(_preds(root), tmp_path / "l.json", root)
                     .read_text(encoding="utf-8"))
    assert doc["columns"] == list(export.CSV_COLUMNS)
    rows = doc["rows"]
    assert [r["path"] for r in rows] == ["a/ünï 图.png", "b.jpg", "c.jpg", "z.jpg"]
    assert all(set(r) == set(export.CSV_COLUMNS) for r in rows)
    assert rows[1]["confidence"] is None and rows[1]["status"] == "error"
    assert rows[2]["corrected"] is True and rows[3]["top2_prob"] == pytest.approx(0.2)


def test_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "q"
    out = tmp_path / "labels.csv"
    export.write_csv(_preds(root)[:1], out, root)
    old = out.read_bytes()
    calls = {"n": 0}
    real = export.row_values

    def failing(*a: object, **kw: object) -> dict:
        calls["n"] += 1
        if calls["n"] % 4 == 3:  # dies mid-file, after rows were written to the temp file
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(export, "row_values", failing)
    with pytest.raises(KeyboardInterrupt):
        export.write_csv(_preds(root), out, root)
    calls["n"] = 0
    with pytest.raises(KeyboardInterrupt):
        export.write_json(_preds(root), tmp_path / "labels.json", root)
    assert out.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.csv"]  # no temp litter


def test_ensure_writable(tmp_path: Path) -> None:
    assert export.ensure_writable(tmp_path / "new.csv") == tmp_path / "new.csv"
    with pytest.raises(UserError, match="does not exist"):
        export.ensure_writable(tmp_path / "missing" / "x.csv")
    with pytest.raises(UserError, match="is a folder"):
        export.ensure_writable(tmp_path)
    assert list(tmp_path.iterdir()) == []  # probing leaves nothing


def test_copy_and_move_into_class_folders(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    files = {"x.jpg": b"1", "a/x.jpg": b"2", "y.jpg": b"3", "bad.jpg": b"4", "u.jpg": b"5"}
    for rel, data in files.items():
        (src / rel).write_bytes(data)
    top = (("cat/evil", 0.9),)
    preds = [Prediction(src / "x.jpg", "cat/evil", 0.9, 0.8, Status.OK, top),
             Prediction(src / "a" / "x.jpg", "cat/evil", 0.9, 0.8, Status.OK, top),
             Prediction(src / "y.jpg", "..", 0.9, 0.8, Status.OK, top),
             Prediction(src / "bad.jpg", None, 0.0, 0.0, Status.ERROR, (), "not an image"),
             Prediction(src / "u.jpg", None, 0.3, 0.0, Status.UNKNOWN, top)]
    dest = tmp_path / "out"
    steps = list(export.copy_to_class_folders(preds, dest))
    assert steps[-1].done == 5 and steps[-1].metrics == {"copied": 4, "failed": 0, "skipped": 1}
    got = {p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    assert got == {"cat_evil/x.jpg": b"2", "cat_evil/x_1.jpg": b"1", "_/y.jpg": b"3",
                   "_unknown/u.jpg": b"5"}
    assert all((src / rel).exists() for rel in files)  # copy keeps sources
    moved = list(export.copy_to_class_folders(preds, dest, move=True))
    assert moved[-1].metrics["moved"] == 4
    assert not (src / "x.jpg").exists() and (src / "bad.jpg").exists()
    assert (dest / "cat_evil" / "x_2.jpg").read_bytes() in (b"1", b"2")
