"""CSV/JSON exports and copying into class folders."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pytest
from engine_fixtures import sample_predictions

from fewshot_studio.engine import export, label_files
from fewshot_studio.engine.api import Prediction, Status
from fewshot_studio.errors import UserError


def test_csv_rows_sorted_relative_utf8(tmp_path: Path) -> None:
    root = tmp_path / "q"
    out = export.write_csv(sample_predictions(root), tmp_path / "labels.csv", root)
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
    absolute = export.read_csv(export.write_csv(sample_predictions(root), tmp_path / "abs.csv",
                                                root, absolute_paths=True))
    assert absolute[3]["path"] == str(root / "z.jpg")


def test_json_carries_the_same_fields(tmp_path: Path) -> None:
    root = tmp_path / "q"
    doc = json.loads(export.write_json(sample_predictions(root), tmp_path / "l.json", root)
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
    export.write_csv(sample_predictions(root)[:1], out, root)
    old = out.read_bytes()
    calls = {"n": 0}
    real = export.row_values

    def failing(*a: object, **kw: object) -> dict:
        calls["n"] += 1
        if calls["n"] % 4 == 3:  # dies mid-file, after rows were written to the temp file
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(label_files, "row_values", failing)
    with pytest.raises(KeyboardInterrupt):
        export.write_csv(sample_predictions(root), out, root)
    calls["n"] = 0
    with pytest.raises(KeyboardInterrupt):
        export.write_json(sample_predictions(root), tmp_path / "labels.json", root)
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
    folders = export.class_folders(["cat/evil", ".."])
    cat, dots = folders["cat/evil"], folders[".."]
    assert cat.startswith("cat_evil-") and dots.startswith("_-")
    assert got == {f"{cat}/x.jpg": b"2", f"{cat}/x_1.jpg": b"1", f"{dots}/y.jpg": b"3",
                   "_unknown/u.jpg": b"5"}
    assert all((src / rel).exists() for rel in files)  # copy keeps sources
    moved = list(export.copy_to_class_folders(preds, dest, move=True))
    assert moved[-1].metrics["moved"] == 4
    assert not (src / "x.jpg").exists() and (src / "bad.jpg").exists()
    assert (dest / cat / "x_2.jpg").read_bytes() in (b"1", b"2")


# -- issue 12 ------------------------------------------------------------------------------
def test_check_output_refuses_files_it_did_not_write(tmp_path: Path) -> None:
    root = tmp_path / "q"
    root.mkdir()
    image = root / "a.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)
    notes = tmp_path / "notes.csv"
    notes.write_text("name,phone\nann,123\n")
    empty = tmp_path / "empty.csv"
    empty.touch()
    for path in (image, notes, empty):
        before = path.read_bytes()
        with pytest.raises(UserError, match="not a labels file") as e:
            export.check_output(path)
        assert str(path) in str(e.value) and "\n" not in str(e.value)
        with pytest.raises(UserError, match="not a labels file"):  # the GUI's path too
            export.write_csv(sample_predictions(root), path, root)
        with pytest.raises(UserError, match="not a labels file"):
            export.write_json(sample_predictions(root), path, root)
        assert path.read_bytes() == before
    with pytest.raises(UserError, match="one of the input images"):
        export.check_output(image, [tmp_path / "other.png", image])
    fifo = tmp_path / "pipe.csv"
    os.mkfifo(fifo)
    with pytest.raises(UserError, match="not a regular file"):
        export.check_output(fifo)
    assert not export.is_labels_file(fifo)  # never blocks on a FIFO
    # our own previous outputs (either format) may be replaced
    csv_out = export.write_csv(sample_predictions(root), tmp_path / "labels.csv", root)
    assert export.write_csv(sample_predictions(root)[:1], csv_out, root) == csv_out
    json_out = export.write_json(sample_predictions(root), tmp_path / "labels.json", root)
    assert export.write_csv(sample_predictions(root), json_out, root) == json_out
    assert export.write_json(sample_predictions(root), tmp_path / "labels.json", root) == json_out
    assert export.check_output(tmp_path / "new.csv") == tmp_path / "new.csv"


def test_csv_cells_never_start_a_formula_and_round_trip(tmp_path: Path) -> None:
    root = tmp_path / "q"
    top = (("=cmd|' /C calc'!A0", 0.6), ("+1", 0.3), ("'quoted", 0.1))
    preds = [Prediction(root / "=HYPERLINK(x).jpg", "@SUM(A1)", 0.6, 0.3, Status.OK, top),
             Prediction(root / "-2+3.png", "-minus", 0.6, 0.3, Status.OK, top),
             Prediction(root / "sub" / "=x.jpg", None, 0.0, 0.0, Status.ERROR, (),
                        "\tbad=1"),
             Prediction(root / "plain.jpg", "cat", 0.6, 0.3, Status.OK, top)]
    out = export.write_csv(preds, tmp_path / "l.csv", root)
    import csv as _csv

    with open(out, encoding="utf-8", newline="") as f:
        raw = list(_csv.DictReader(f))
    dangerous = ("=", "+", "-", "@", "\t", "\r")
    for row in raw:
        for col in ("path", "label", "error", "top1", "top2", "top3"):
            assert not row[col].startswith(dangerous), (col, row[col])
    by = {r["path"]: r for r in raw}
    assert by["./=HYPERLINK(x).jpg"]["label"] == "'@SUM(A1)"
    assert by["./-2+3.png"]["top2"] == "'+1" and by["./-2+3.png"]["top3"] == "''quoted"
    assert by["sub/=x.jpg"]["error"] == "'\tbad=1"
    assert by["plain.jpg"]["label"] == "cat"
    rows = export.read_csv(out)
    assert [r["path"] for r in rows] == ["-2+3.png", "=HYPERLINK(x).jpg", "plain.jpg",
                                         "sub/=x.jpg"]
    assert rows[1]["label"] == "@SUM(A1)" and rows[0]["label"] == "-minus"
    assert [rows[0][f"top{k}"] for k in (1, 2, 3)] == [name for name, _ in top]
    assert rows[3]["error"] == "\tbad=1"
    doc = json.loads(export.write_json(preds, tmp_path / "l.json", root).read_text("utf-8"))
    assert doc["rows"][1]["path"] == "=HYPERLINK(x).jpg"  # JSON: values as they are
    assert doc["rows"][1]["label"] == "@SUM(A1)"


def _strict_json(path: Path) -> dict:
    def no_constants(name: str) -> None:
        raise AssertionError(f"bare {name} in JSON")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=no_constants)


def test_non_finite_predictions_become_error_rows(tmp_path: Path) -> None:
    root = tmp_path / "q"
    nan, inf = float("nan"), float("inf")
    preds = [Prediction(root / "a.jpg", "cat", nan, nan, Status.OK, (("cat", nan),)),
             Prediction(root / "b.jpg", "dog", 0.9, 0.5, Status.OK, (("dog", 0.9), ("cat", inf))),
             Prediction(root / "c.jpg", "dog", 0.9, 0.5, Status.OK, (("dog", 0.9),))]
    doc = _strict_json(export.write_json(preds, tmp_path / "l.json", root))
    a, b, c = doc["rows"]
    for row in (a, b):
        assert row["status"] == "error" and row["error"] == export.NON_FINITE_ERROR
        assert row["label"] is None and row["confidence"] is None and row["top2_prob"] is None
    assert c["status"] == "ok" and c["confidence"] == pytest.approx(0.9)
    rows = export.read_csv(export.write_csv(preds, tmp_path / "l.csv", root))
    assert [r["status"] for r in rows] == ["error", "error", "ok"]
    assert "nan" not in (tmp_path / "l.csv").read_text().lower()
    assert "inf" not in (tmp_path / "l.csv").read_text().lower()
    steps = list(export.copy_to_class_folders(preds, tmp_path / "d"))  # never sorted either
    assert steps[-1].metrics == {"copied": 0, "failed": 1, "skipped": 2}


def test_class_folders_are_one_to_one(tmp_path: Path) -> None:
    folders = export.class_folders(["x:y", "x_y", "_unknown", "Cat", "cat", "dog", "a" * 300])
    assert len(set(map(str.casefold, folders.values()))) == len(folders)
    assert export.UNKNOWN_FOLDER.casefold() not in {f.casefold() for f in folders.values()}
    assert folders["x_y"] == "x_y" and folders["dog"] == "dog"
    assert folders["x:y"].startswith("x_y-") and folders["_unknown"].startswith("_unknown-")
    assert folders["Cat"] != folders["cat"] and len(folders["a" * 300]) < 120
    assert export.class_folders(["x_y", "x:y"]) == {k: folders[k] for k in ("x_y", "x:y")}
    # through a copy: every class keeps its own folder, _unknown holds only unknown images
    src = tmp_path / "src"
    src.mkdir()
    labels = {"1.jpg": "x:y", "2.jpg": "x_y", "3.jpg": "_unknown", "4.jpg": None}
    preds = []
    for name, label in labels.items():
        (src / name).write_bytes(name.encode())
        status = Status.OK if label else Status.UNKNOWN
        preds.append(Prediction(src / name, label, 0.9, 0.5, status, ((label or "x_y", 0.9),)))
    dest = tmp_path / "dest"
    list(export.copy_to_class_folders(preds, dest))
    got = {p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()}
    assert got == {f"{folders['x:y']}/1.jpg", "x_y/2.jpg", f"{folders['_unknown']}/3.jpg",
                   "_unknown/4.jpg"}


def test_failed_copy_leaves_no_partial_file(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    src = tmp_path / "src"
    src.mkdir()
    preds = []
    for i in range(4):
        (src / f"{i}.jpg").write_bytes(bytes([i]) * 5000)
        preds.append(Prediction(src / f"{i}.jpg", "cat", 0.9, 0.5, Status.OK, (("cat", 0.9),)))
    dest = tmp_path / "dest"
    (dest / "cat").mkdir(parents=True)
    (dest / "cat" / "0.jpg").write_bytes(b"the user's own file")

    def disk_full(fsrc: object, fdst: object) -> None:  # writes a little, then ENOSPC
        fdst.write(fsrc.read(100))  # type: ignore[attr-defined]
        fdst.flush()  # type: ignore[attr-defined]
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(export, "_copy_bytes", disk_full)
    steps = list(export.copy_to_class_folders(preds, dest))
    assert steps[-1].metrics == {"copied": 0, "failed": 4, "skipped": 0}
    assert [s.payload[2] for s in steps] == [os.strerror(errno.ENOSPC)] * 4
    assert sorted(p.name for p in (dest / "cat").iterdir()) == ["0.jpg"]
    assert (dest / "cat" / "0.jpg").read_bytes() == b"the user's own file"
    # a move across filesystems (no hard link) that fails keeps every source
    real_link = os.link

    def cross_device(a: object, b: object) -> None:
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    monkeypatch.setattr(os, "link", cross_device)
    steps = list(export.copy_to_class_folders(preds, dest, move=True))
    assert steps[-1].metrics == {"moved": 0, "failed": 4, "skipped": 0}
    assert all(p.path.read_bytes() == bytes([i]) * 5000 for i, p in enumerate(preds))
    assert sorted(p.name for p in (dest / "cat").iterdir()) == ["0.jpg"]
    # and when it works, a move never replaces the user's file
    monkeypatch.setattr(os, "link", real_link)
    monkeypatch.undo()
    steps = list(export.copy_to_class_folders(preds, dest, move=True))
    assert steps[-1].metrics == {"moved": 4, "failed": 0, "skipped": 0}
    assert (dest / "cat" / "0.jpg").read_bytes() == b"the user's own file"
    assert (dest / "cat" / "0_1.jpg").read_bytes() == bytes([0]) * 5000
    assert not any(src.iterdir())


def test_two_copy_runs_into_one_folder_keep_every_file(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib
    import threading

    n = 60
    runs = []
    for r in range(2):
        src = tmp_path / f"src{r}"
        src.mkdir()
        preds = []
        for i in range(n):
            (src / f"{i % 7}_{i // 7}.jpg").write_bytes(f"{r}/{i}".encode())
            preds.append(Prediction(src / f"{i % 7}_{i // 7}.jpg", "cat", 0.9, 0.5, Status.OK,
                                    (("cat", 0.9),)))
        runs.append(preds)
    barrier = threading.Barrier(2)
    real = export._copy_bytes

    def in_step(fsrc: object, fdst: object) -> None:  # both runs copy at the same moment
        with contextlib.suppress(threading.BrokenBarrierError):
            barrier.wait(timeout=2)
        real(fsrc, fdst)  # type: ignore[arg-type]

    monkeypatch.setattr(export, "_copy_bytes", in_step)
    dest = tmp_path / "dest"
    results: list[dict] = []

    def one(preds: list[Prediction]) -> None:
        results.append(list(export.copy_to_class_folders(preds, dest))[-1].metrics)

    threads = [threading.Thread(target=one, args=(p,)) for p in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [{"copied": n, "failed": 0, "skipped": 0}] * 2
    digest = sorted(hashlib.sha256(p.read_bytes()).hexdigest()
                    for p in (dest / "cat").iterdir())
    want = sorted(hashlib.sha256(p.path.read_bytes()).hexdigest() for ps in runs for p in ps)
    assert digest == want


# -- issue 14 ------------------------------------------------------------------------------
def test_copy_skip_unknown_leaves_unknown_images(tmp_path: Path) -> None:
    """``skip_unknown``: unknown images stay where they are (no ``_unknown`` folder) and count
    as skipped; labeled and corrected ones are copied as before."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("x.jpg", "u.jpg", "bad.jpg"):
        (src / name).write_bytes(name.encode())
    top = (("cat", 0.9),)
    preds = [Prediction(src / "x.jpg", "cat", 0.9, 0.8, Status.OK, top),
             Prediction(src / "u.jpg", None, 0.3, 0.0, Status.UNKNOWN, top),
             Prediction(src / "bad.jpg", None, 0.0, 0.0, Status.ERROR, (), "not an image")]
    steps = list(export.copy_to_class_folders(preds, tmp_path / "out", move=True,
                                              skip_unknown=True))
    assert steps[-1].metrics == {"moved": 1, "failed": 0, "skipped": 2}
    assert [s.message for s in steps] == ["skipped (error)", "skipped (unknown)", "x.jpg"]
    assert sorted(p.relative_to(tmp_path / "out").as_posix()
                  for p in (tmp_path / "out").rglob("*")) == ["cat", "cat/x.jpg"]
    assert (src / "u.jpg").exists() and not (src / "x.jpg").exists()


def test_read_labels_csv(tmp_path: Path) -> None:
    """``label --labels``: a header naming path and label (any order, other columns
    ignored) or plain path,label rows; relative paths from the query root; empty labels left
    out; our own CSV reads back with its escapes undone; bad files are a UserError."""
    root = tmp_path / "q"
    f = tmp_path / "l.csv"
    f.write_text("\ufeffLabel,notes,Path\ncat,x,a/1.jpg\n,,b.jpg\ndog,,/abs/2.jpg\n",
                 encoding="utf-8")
    assert export.read_labels_csv(f, root) == [(root / "a" / "1.jpg", "cat"),
                                               (Path("/abs/2.jpg"), "dog")]
    f.write_text("a/1.jpg,cat\n\nc.jpg,dog\n", encoding="utf-8")
    assert export.read_labels_csv(f, root) == [(root / "a" / "1.jpg", "cat"),
                                               (root / "c.jpg", "dog")]
    ours = export.write_csv([Prediction(root / "=x.jpg", "@odd", 0.9, 0.5, Status.OK, ()),
                             *sample_predictions(root)], tmp_path / "ours.csv", root)
    assert export.read_labels_csv(ours, root) == [
        (root / "=x.jpg", "@odd"), (root / "c.jpg", "dog"), (root / "z.jpg", "cat")]
    f.write_text("just-a-path\n", encoding="utf-8")
    with pytest.raises(UserError, match="line 1: expected path and label"):
        export.read_labels_csv(f, root)
    f.write_bytes(b"path,label\n\xff\xfe,cat\n")
    with pytest.raises(UserError, match="cannot read --labels file"):
        export.read_labels_csv(f, root)
    with pytest.raises(UserError, match="not found"):
        export.read_labels_csv(tmp_path / "missing.csv", root)


def test_format_table() -> None:
    """One table of label file formats; ``format_for`` picks by name or by suffix."""
    assert list(export.EXPORT_FORMATS) == ["csv", "json", "labelstudio", "fiftyone",
                                            "parquet"]
    assert export.format_for(Path("x.JSON")).name == "json"
    assert export.format_for(Path("x.txt")).name == "csv"
    assert export.format_for(Path("x.csv"), "fiftyone").name == "fiftyone"
    with pytest.raises(UserError, match="unknown format"):
        export.format_for(Path("x.csv"), "xml")


def test_parquet_rows_match_the_csv(tmp_path: Path) -> None:
    """Parquet: the CSV's rows, typed (nulls where the CSV has empty cells), in path order,
    our format in the metadata; a second write replaces our own file, never a stranger's."""
    pq = pytest.importorskip("pyarrow.parquet")
    root = tmp_path / "q"
    assert export.format_for(Path("x.Parquet")).name == "parquet"
    out = export.write_parquet(sample_predictions(root), tmp_path / "l.parquet", root)
    rows = export.read_parquet(out)
    csv_rows = export.read_csv(export.write_csv(sample_predictions(root), tmp_path / "l.csv",
                                                root))
    assert [list(r) for r in rows] == [list(export.CSV_COLUMNS)] * len(csv_rows)
    for typed, text in zip(rows, csv_rows, strict=True):
        assert {c: "" if v is None else str(v).lower() if isinstance(v, bool)
                else f"{v:.6f}" if isinstance(v, float) else v
                for c, v in typed.items()} == text
    assert pq.read_schema(out).metadata[b"format"] == export.JSON_FORMAT.encode()
    assert export.is_labels_file(out)
    export.write_parquet(sample_predictions(root)[:1], out, root)  # ours: replaced
    assert len(export.read_parquet(out)) == 1
    stranger = tmp_path / "theirs.parquet"
    stranger.write_bytes(b"PAR1" + b"\0" * 20 + (8).to_bytes(4, "little") + b"PAR1")
    assert not export.is_labels_file(stranger)
    with pytest.raises(UserError, match="not a labels file"):
        export.write_parquet(sample_predictions(root), stranger, root)


def test_sinks_stream_batches_in_order(tmp_path: Path) -> None:
    """A sink takes batches (in path order) and writes the same file as one call; a failure
    inside the block leaves no file and no temp file."""
    root = tmp_path / "q"
    preds = sorted(sample_predictions(root), key=lambda p: p.path)
    with export.csv_sink(tmp_path / "s.csv", root) as add:
        add(preds[:1])
        add(preds[1:])
    whole = export.write_csv(preds, tmp_path / "w.csv", root)
    assert (tmp_path / "s.csv").read_bytes() == whole.read_bytes()
    with pytest.raises(RuntimeError), export.csv_sink(tmp_path / "x.csv", root) as add:
        add(preds)
        raise RuntimeError("stop")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.csv", "w.csv"]


def test_parquet_needs_pyarrow(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without pyarrow, asking for parquet is a one-line UserError that says what to
    install, before any work."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "pyarrow" else real(name, *a))
    with pytest.raises(UserError, match=r"fewshot-studio\[cluster\]"):
        export.format_for(Path("x.parquet"))
