"""The bad-input suite (issue 12): every case builds its bad input, runs it (through the CLI
wherever a user meets it) and checks what the user sees — a one-line error and exit 2 before
any work, an error row, or a warning and exit 1 — and, for every CLI case, that no input
file changed (every file under the inputs hashed before and after, see
``bad_input_helpers.snapshot``). The README's "Bad input" section lists each behaviour."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from bad_input_helpers import (
    CliResult,
    LabelEnv,
    cache_disk_full,
    corrupt_sqlite_pages,
    deny_listing,
    peak_rss_bytes,
    run_cli,
    snapshot,
    tamper_checkpoint,
)
from engine_fixtures import colour_image, make_queries
from fixtures_data import write_bad_files, write_odd_files

from fewshot_studio.cli import main
from fewshot_studio.data.scan import scan_images
from fewshot_studio.engine import export
from fewshot_studio.engine.export import read_csv
from fewshot_studio.errors import UserError
from fewshot_studio.gui import project_io as pio
from fewshot_studio.io.atomic import STALE_TEMP_AGE_S

# ------------------------------------------------------------------------------------------------
# Outputs: --out, copy and move, class folders, the query scan (defects 2, 3, 7, 8, 9, 10, 11, 15)
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> LabelEnv:
    """One checkpoint and cache for the module (the ONNX export happens once)."""
    return LabelEnv.make(tmp_path_factory.mktemp("outputs_shared"))


@pytest.fixture
def env(shared: LabelEnv, tmp_path: Path) -> LabelEnv:
    """Fresh support and query folders (copies), the shared checkpoint and cache."""
    shutil.copytree(shared.support, tmp_path / "support")
    shutil.copytree(shared.query, tmp_path / "query")
    return LabelEnv(tmp_path, shared.ckpt, tmp_path / "support", tmp_path / "query")


def _args(env: LabelEnv, shared: LabelEnv, out: Path, *extra: str | os.PathLike[str]) -> list:
    return env.label_args(out, "--unknown-threshold", "0", *extra,
                          cache=shared.root / "cache.sqlite")


def _contents(*roots: Path) -> Counter[str]:
    """The multiset of file hashes under ``roots`` (where files are does not matter)."""
    return Counter(h for h in snapshot(*roots).values())


def _err_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error: ")]


@pytest.mark.parametrize("which", ["query_image", "support_image", "text_file", "empty_file"])
def test_outputs_out_onto_a_file_we_did_not_write_is_refused(
        env: LabelEnv, shared: LabelEnv, capsys: pytest.CaptureFixture[str], which: str) -> None:
    out = {"query_image": env.query / "red_0.jpg",
           "support_image": env.support / "red" / "0.png",
           "text_file": env.root / "notes.csv", "empty_file": env.root / "labels.csv"}[which]
    if which == "text_file":
        out.write_text("name,phone\nann,123\n")
    elif which == "empty_file":
        out.touch()
    before = snapshot(env.support, env.query, out)
    r = run_cli(capsys, *_args(env, shared, out, "--copy-to", env.root / "sorted"))
    assert r.code == 2
    assert len(_err_lines(r.err)) == 1 and str(out) in _err_lines(r.err)[0]
    want = "one of the input images" if which.endswith("image") else "not a labels file"
    assert want in r.err and "Traceback" not in r.err
    assert snapshot(env.support, env.query, out) == before
    assert not (env.root / "sorted").exists()  # refused before any work


def test_outputs_export_onnx_never_replaces_a_file_it_did_not_write(
        shared: LabelEnv, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``export-onnx --out`` onto an image or a foreign file: exit 2, file unchanged; onto an
    export of ours: replaced."""
    victim = tmp_path / "photo.onnx"
    colour_image("red", 0).save(victim, format="PNG")
    before = snapshot(victim)
    r = run_cli(capsys, "export-onnx", "--checkpoint", shared.ckpt, "--out", victim)
    assert r.code == 2 and "not an ONNX export" in r.err and str(victim) in r.err
    assert snapshot(victim) == before
    ours = tmp_path / "model.onnx"
    assert run_cli(capsys, "export-onnx", "--checkpoint", shared.ckpt, "--out", ours).code == 0
    assert run_cli(capsys, "export-onnx", "--checkpoint", shared.ckpt, "--out", ours).code == 0


def test_outputs_previous_labels_file_is_replaced(
        env: LabelEnv, shared: LabelEnv, capsys: pytest.CaptureFixture[str]) -> None:
    before = snapshot(env.support, env.query)
    for out in (env.root / "labels.csv", env.root / "labels.json"):
        assert run_cli(capsys, *_args(env, shared, out)).code == 0
        first = out.read_bytes()
        assert run_cli(capsys, *_args(env, shared, out)).code == 0  # our own file: replaced
        assert out.read_bytes() == first
    assert snapshot(env.support, env.query) == before


@pytest.mark.parametrize("move", [False, True])
def test_outputs_copy_onto_a_full_disk_fails_loudly(
        env: LabelEnv, shared: LabelEnv, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch, move: bool) -> None:
    dest = env.root / "sorted"
    (dest / "red").mkdir(parents=True)
    (dest / "red" / "red_0.jpg").write_bytes(b"the user's own file")
    before = snapshot(env.support, env.query, dest)
    contents = _contents(env.query)

    def disk_full(fsrc: object, fdst: object) -> None:
        fdst.write(fsrc.read(64))  # type: ignore[attr-defined]
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def no_hard_links(src: object, dst: object) -> None:
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))  # dest on another disk

    monkeypatch.setattr(export, "_copy_bytes", disk_full)
    monkeypatch.setattr(os, "link", no_hard_links)
    out = env.root / "labels.csv"
    flag = "--move-to" if move else "--copy-to"
    r = run_cli(capsys, *_args(env, shared, out, flag, dest))
    n = len(contents)
    assert r.code == 1, r.err
    verb = "move" if move else "copy"
    failed = [line for line in r.err.splitlines() if line.startswith(f"failed to {verb} ")]
    assert len(failed) == 5 and "No space left on device" in failed[0]
    assert f"... and {n - 5} more" in r.err
    assert f"{'moved' if move else 'copied'} 0 files into {dest}, {n} failed" in r.out
    assert len(export.read_csv(out)) == n  # the CSV is still written
    assert snapshot(env.support, env.query, dest) == before  # no partial files, sources kept


def test_outputs_two_copy_runs_into_one_folder_keep_every_file(
        env: LabelEnv, shared: LabelEnv, capsys: pytest.CaptureFixture[str]) -> None:
    query2 = env.root / "query2"
    shutil.copytree(env.query, query2)
    for p in query2.iterdir():  # same names, other bytes
        if p.suffix == ".png":
            colour_image("blue", 50).save(p)
    before = snapshot(env.support, env.query, query2)
    dest = env.root / "sorted"
    codes: list[int] = []

    def one(query: Path, i: int) -> None:
        run = LabelEnv(env.root, env.ckpt, env.support, query)
        argv = run.label_args(env.root / f"l{i}.csv", "--unknown-threshold", "0", "--copy-to",
                              dest, "--backend", "torch", cache=env.root / f"cache{i}.sqlite")
        codes.append(main([os.fspath(a) for a in argv]))

    threads = [threading.Thread(target=one, args=(q, i)) for i, q in enumerate([env.query,
                                                                                 query2])]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    capsys.readouterr()
    assert codes == [0, 0]
    assert _contents(dest) == _contents(env.query) + _contents(query2)
    assert snapshot(env.support, env.query, query2) == before


def test_outputs_class_folders_never_collide(
        env: LabelEnv, shared: LabelEnv, capsys: pytest.CaptureFixture[str]) -> None:
    names = {"red": "x:y", "green": "x_y", "blue": "_unknown"}
    for colour, name in names.items():
        (env.support / colour).rename(env.support / name)
    before = snapshot(env.support, env.query)
    dest, out = env.root / "sorted", env.root / "labels.csv"
    r = run_cli(capsys, *_args(env, shared, out, "--copy-to", dest))
    assert r.code == 0, r.err
    folders = export.class_folders(names.values())
    assert folders["x_y"] == "x_y" and len(set(folders.values())) == 3
    assert export.UNKNOWN_FOLDER not in folders.values()
    rows = export.read_csv(out)
    for row in rows:
        assert row["status"] == "ok"
        src = hashlib.sha256((env.query / row["path"]).read_bytes()).hexdigest()
        got = snapshot(dest / folders[row["label"]])
        assert src in got.values(), row
    per_folder = {d.name: len(list(d.iterdir())) for d in dest.iterdir()}
    assert per_folder == Counter(folders[r["label"]] for r in rows)
    assert snapshot(env.support, env.query) == before


def test_outputs_support_inside_query_is_never_labeled_or_moved(
        env: LabelEnv, shared: LabelEnv, capsys: pytest.CaptureFixture[str]) -> None:
    support = env.query / "examples"
    env.support.rename(support)
    n_support = len(snapshot(support))
    dest, out = env.root / "sorted", env.root / "labels.csv"
    before = snapshot(support)
    contents = _contents(env.query) - _contents(support)
    r = run_cli(capsys, "label", "--checkpoint", env.ckpt, "--support", support, "--query",
                env.query, "--out", out, "--cache", shared.root / "cache.sqlite",
                "--device", "cpu", "--unknown-threshold", "0", "--move-to", dest)
    assert r.code == 0, r.err
    assert f"note: left out {n_support} image(s) under the query folder: {n_support} in the " \
           f"support folder {support}" in r.err
    assert snapshot(support) == before
    assert not any(row["path"].startswith("examples/") for row in export.read_csv(out))
    assert _contents(dest) == contents  # every other image moved, bytes intact
    assert set(snapshot(env.query)) == set(before)  # nothing left but the support


def test_outputs_destination_inside_query_is_not_labeled_again(
        env: LabelEnv, shared: LabelEnv, capsys: pytest.CaptureFixture[str]) -> None:
    dest, out = env.query / "sorted", env.root / "labels.csv"
    before = snapshot(env.support, env.query)
    n = len(before) - len(snapshot(env.support))
    assert run_cli(capsys, *_args(env, shared, out, "--copy-to", dest)).code == 0
    r = run_cli(capsys, *_args(env, shared, out, "--copy-to", dest))
    assert r.code == 0
    assert f"left out {n} image(s) under the query folder: {n} in the --copy-to folder" in r.err
    assert len(export.read_csv(out)) == n
    assert len(snapshot(dest)) == 2 * n  # the second run copied the originals, not copies
    after = snapshot(env.support, env.query)
    assert {k: v for k, v in after.items() if not k.startswith(str(dest))} == before


def test_outputs_unreadable_sub_folder_is_an_error_row(
        env: LabelEnv, shared: LabelEnv, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    locked = env.query / "locked"
    locked.mkdir()
    colour_image("red", 7).save(locked / "a.png")
    before = snapshot(env.support, env.query)
    deny_listing(monkeypatch, locked)
    out = env.root / "labels.csv"
    r = run_cli(capsys, *_args(env, shared, out))
    assert r.code == 1
    assert f"warning: cannot read folder {locked}: Permission denied" in r.err
    assert "unreadable folders 1" in r.out
    rows = {row["path"]: row for row in export.read_csv(out)}
    assert rows["locked"]["status"] == "error"
    assert rows["locked"]["error"] == "cannot read folder: Permission denied"
    assert "locked/a.png" not in rows
    deny_listing(monkeypatch, env.query)  # the query folder itself: refused
    r = run_cli(capsys, *_args(env, shared, env.root / "other.csv"))
    assert r.code == 2 and f"error: cannot read folder {env.query}: Permission denied" in r.err
    monkeypatch.undo()
    assert snapshot(env.support, env.query) == before


def test_outputs_non_finite_predictions_never_reach_the_json(
        env: LabelEnv, shared: LabelEnv, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    from dataclasses import replace

    from fewshot_studio.engine.session import LabelingSession

    real = LabelingSession.predictions

    def broken(self: LabelingSession) -> list:  # what NaN weights give
        return [replace(p, confidence=float("nan"), top=((p.top[0][0], float("nan")),))
                for p in real(self)]

    monkeypatch.setattr(LabelingSession, "predictions", broken)
    before = snapshot(env.support, env.query)
    out, dest = env.root / "labels.json", env.root / "sorted"
    r = run_cli(capsys, *_args(env, shared, out, "--copy-to", dest))
    assert r.code == 0, r.err

    def no_constants(name: str) -> None:
        raise AssertionError(f"bare {name} in the JSON")

    doc = json.loads(out.read_text(encoding="utf-8"), parse_constant=no_constants)
    assert doc["rows"] and all(row["status"] == "error" and row["confidence"] is None
                               and row["error"] == export.NON_FINITE_ERROR
                               for row in doc["rows"])
    n = len(doc["rows"])
    assert f"labeled 0, unknown 0, errors {n} of {n}" in r.out
    assert not any(p.is_file() for p in dest.rglob("*"))  # nothing sorted on garbage
    assert snapshot(env.support, env.query) == before


def test_outputs_formula_names_are_escaped_in_the_csv(
        env: LabelEnv, shared: LabelEnv, capsys: pytest.CaptureFixture[str]) -> None:
    names = ["=HYPERLINK(evil).jpg", "+1.png", "-2.png", "@SUM(A1).jpg"]
    for i, name in enumerate(names):
        colour_image("red", 20 + i).save(env.query / name)
    (env.support / "red").rename(env.support / "=cmd")
    before = snapshot(env.support, env.query)
    out = env.root / "labels.csv"
    assert run_cli(capsys, *_args(env, shared, out)).code == 0
    raw = out.read_text(encoding="utf-8")
    for line in raw.splitlines()[1:]:
        assert not line.startswith(("=", "+", "-", "@"))
        assert ",=" not in line and ",+" not in line and ",@" not in line and ",-" not in line
    rows = {row["path"]: row for row in export.read_csv(out)}
    assert set(names) <= set(rows)
    assert {rows[n]["label"] for n in names} == {"=cmd"}
    assert snapshot(env.support, env.query) == before


def test_outputs_sorting_in_place_leaves_sorted_files_alone(
        env: LabelEnv, shared: LabelEnv, capsys: pytest.CaptureFixture[str]) -> None:
    out = env.root / "labels.csv"
    contents = _contents(env.query)
    r = run_cli(capsys, *_args(env, shared, out, "--move-to", env.query))
    assert r.code == 0, r.err
    assert {p.parent.name for p in env.query.rglob("*") if p.is_file()} == {"red", "green",
                                                                             "blue"}
    moved = snapshot(env.query)
    r = run_cli(capsys, *_args(env, shared, out, "--move-to", env.query))  # nothing to do
    assert r.code == 0 and f"left out {len(moved)} image(s)" in r.err
    assert snapshot(env.query) == moved and _contents(env.query) == contents
    assert export.read_csv(out) == []


def test_outputs_cache_failures_are_reported_and_exit_1(
        env: LabelEnv, shared: LabelEnv, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    from fewshot_studio.engine.session import LabelingSession

    real = LabelingSession.run

    def run(self: LabelingSession, paths: list) -> object:  # as if the cache broke mid-run
        yield from real(self, paths)
        self.counters.cache_failures = 2
        self.counters.cache_disabled = "cannot write the cache: disk full"

    monkeypatch.setattr(LabelingSession, "run", run)
    before = snapshot(env.support, env.query)
    out = env.root / "labels.csv"
    r = run_cli(capsys, *_args(env, shared, out))
    assert r.code == 1
    assert "; cache failures 2; cache off: cannot write the cache: disk full" in r.out
    assert len(export.read_csv(out)) == len(before) - len(snapshot(env.support))
    assert snapshot(env.support, env.query) == before


def test_outputs_unreadable_support_folder_is_refused(
        env: LabelEnv, shared: LabelEnv, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    locked = env.support / "red" / "more"
    locked.mkdir()
    colour_image("red", 8).save(locked / "a.png")
    before = snapshot(env.support, env.query)
    deny_listing(monkeypatch, locked)
    out = env.root / "labels.csv"
    r = run_cli(capsys, *_args(env, shared, out))
    assert r.code == 2
    assert _err_lines(r.err) == [f"error: cannot read support folder {locked}: "
                                 "Permission denied"]
    assert not out.exists()
    monkeypatch.undo()
    assert snapshot(env.support, env.query) == before


# ------------------------------------------------------------------------------------------------
# The embedding cache (defects 1, 4, 5)
# ------------------------------------------------------------------------------------------------

def _cache_rows(out: Path) -> list[dict[str, str]]:
    return export.read_csv(out)


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory: pytest.TempPathFactory) -> LabelEnv:
    return LabelEnv.make(tmp_path_factory.mktemp("cache_env"))


def _png_bytes() -> bytes:
    import io

    from engine_fixtures import colour_image

    buf = io.BytesIO()
    colour_image("red", 0).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("name", ["notes.txt", "holiday.png", "app.db"])
def test_cache_refuses_a_file_that_is_not_a_cache(cache_env: LabelEnv, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str],
                                                   name: str) -> None:
    """Defect 1: ``--cache`` naming a text file, an image or someone else's SQLite database
    is refused with exit 2 before any work; the file is left as it was (it used to be
    deleted and replaced by a database)."""
    cache = tmp_path / name
    if name.endswith(".txt"):
        cache.write_text("shopping list\nmilk\n")
    elif name.endswith(".png"):
        cache.write_bytes(_png_bytes())
    else:
        with sqlite3.connect(cache) as db:
            db.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
            db.execute("INSERT INTO invoices (total) VALUES (12.5)")
        db.close()
    out = tmp_path / "labels.csv"
    before = snapshot(cache_env.support, cache_env.query, cache_env.ckpt, tmp_path)
    r = run_cli(capsys, *cache_env.label_args(out, cache=cache))
    assert r.code == 2
    assert r.err.startswith("error: ") and str(cache) in r.err
    assert len(r.err.strip().splitlines()) == 1
    assert "not an embedding cache" in r.err
    assert snapshot(cache_env.support, cache_env.query, cache_env.ckpt, tmp_path) == before
    assert not out.exists()


def test_cache_with_damaged_pages_two_runs_complete(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]
                                                    ) -> None:
    """Defect 5: a cache whose middle pages are damaged is moved aside (renamed, kept) at the
    first error; that run writes every row and exits 1 (a cache failure); the next run
    starts a fresh cache and exits 0. It used to fail with "malformed" on every run."""
    env = LabelEnv.make(tmp_path / "env")
    cache = tmp_path / "cache.sqlite"
    out = tmp_path / "labels.csv"
    args = env.label_args(out, "--backend", "torch", cache=cache)
    assert run_cli(capsys, *args).code == 0
    good = _cache_rows(out)
    corrupt_sqlite_pages(cache, range(2, 5))
    damaged = cache.read_bytes()
    inputs = snapshot(env.support, env.query, env.ckpt)

    first = run_cli(capsys, *args)
    assert first.code == 1, first.err
    assert _cache_rows(out) == good  # every row, the same labels
    moved = sorted(tmp_path.glob("cache.sqlite.corrupt-*"))
    assert [p.name for p in moved if not p.name.endswith(("-wal", "-shm"))] != []
    assert moved[0].read_bytes() == damaged  # kept as it was, for a look

    second = run_cli(capsys, *args)
    assert second.code == 0, second.err
    assert _cache_rows(out) == good
    third = run_cli(capsys, *args)  # the fresh cache serves
    assert third.code == 0 and "embedded 0" in third.out
    assert snapshot(env.support, env.query, env.ckpt) == inputs


def test_cache_full_disk_run_completes(cache_env: LabelEnv, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Defect 4: a cache that cannot be written (a full disk) is switched off for the run
    with a warning; the CSV is still written, with every row, and the exit code is 1. It used
    to end in "cannot rollback - no transaction is active", a traceback and no CSV."""
    out = tmp_path / "labels.csv"
    reference = tmp_path / "reference.csv"
    args = cache_env.label_args(reference, "--backend", "torch", cache=tmp_path / "ok.sqlite")
    assert run_cli(capsys, *args).code == 0
    before = snapshot(cache_env.support, cache_env.query, cache_env.ckpt)
    cache_disk_full(monkeypatch)
    r = run_cli(capsys, *cache_env.label_args(out, "--backend", "torch",
                                              cache=tmp_path / "full.sqlite"))
    assert r.code == 1, r.err
    assert "Traceback" not in r.err and "disk is full" in r.out + r.err
    assert _cache_rows(out) == _cache_rows(reference)  # every row, as without the cache trouble
    assert snapshot(cache_env.support, cache_env.query, cache_env.ckpt) == before


def test_cache_full_disk_engine_counts_the_failure(cache_env: LabelEnv, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """Defect 4 at the engine: the counters say the cache failed and why; one warning; every
    query has its prediction."""
    import logging

    from fewshot_studio.cli.label import support_classes
    from fewshot_studio.engine.api import LabelSettings, Status
    from fewshot_studio.engine.session import LabelingSession

    cache_disk_full(monkeypatch)
    queries = list(scan_images(cache_env.query))
    with caplog.at_level(logging.WARNING, logger="fewshot_studio.engine.cache"), \
            LabelingSession(cache_env.ckpt, LabelSettings(device="cpu"),
                            cache_path=tmp_path / "full.sqlite", backend="torch") as s:
        s.set_support(support_classes(cache_env.support))
        for _ in s.run(queries):
            pass
        preds = s.predictions()
        counters = s.counters
    assert counters.cache_failures > 0
    assert "database or disk is full" in counters.cache_disabled
    assert str(tmp_path / "full.sqlite") in counters.cache_disabled
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1
    assert len(preds) == len(queries) and all(p.status != Status.ERROR for p in preds)
    assert counters.embedded == len(queries) + 9  # + the support images


# ------------------------------------------------------------------------------------------------
# Untrusted files, sizes and structures (defects 6, 7, 12, 13; the planted files)
# ------------------------------------------------------------------------------------------------

needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")


def _files_run_unblocked(fifos: list[Path], fn: Callable[[], Any], timeout: float = 60.0) -> Any:
    """``fn()`` in a thread; if it is still running after ``timeout`` (a FIFO was opened and
    blocks), open the FIFOs' write ends so the readers get EOF, then fail: a regression fails
    the test instead of hanging it."""
    box: list[Any] = []
    t = threading.Thread(target=lambda: box.append(fn()), daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        for _ in range(50):
            for f in fifos:
                with contextlib.suppress(OSError):
                    os.close(os.open(f, os.O_WRONLY | os.O_NONBLOCK))
            t.join(0.1)
        pytest.fail(f"the run blocked on a FIFO ({', '.join(f.name for f in fifos)})")
    assert box, "the run raised (see the thread's traceback above)"
    return box[0]


def _rows_by_path(out: Path) -> dict[str, dict[str, str]]:
    return {r["path"]: r for r in read_csv(out)}


# -- defect 6a: a huge file named like an image ------------------------------------------------
def test_files_sparse_video_jpg_is_refused_unread(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    env = LabelEnv.make(tmp_path)
    video = env.query / "video.jpg"
    with open(video, "wb") as f:
        f.truncate(1536 << 20)  # 1.5 GB, sparse: costs no disk
    st = os.stat(video)
    inputs = [p for p in env.query.iterdir() if p != video] + [env.support]  # all but video
    others = snapshot(*inputs)
    before, t0 = peak_rss_bytes(), time.perf_counter()
    r = run_cli(capsys, *env.label_args(tmp_path / "out.csv"))
    grew, took = peak_rss_bytes() - before, time.perf_counter() - t0
    assert r.code == 0, r.err
    row = _rows_by_path(tmp_path / "out.csv")["video.jpg"]
    assert row["status"] == "error"
    assert row["error"] == "file too large (1536 MB; the limit is 256 MB)"
    assert grew < 1 << 30, f"peak memory grew by {grew >> 20} MB"  # was 1.9 GB
    assert took < 30, took  # was 19 s on top of the run
    assert snapshot(*inputs) == others
    st2 = os.stat(video)  # not hashed (1.5 GB): size and times unchanged, never written
    assert (st2.st_size, st2.st_mtime_ns) == (st.st_size, st.st_mtime_ns)


@needs_fifo
def test_files_fifo_in_query_folder_gets_an_error_row(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    env = LabelEnv.make(tmp_path)
    fifos = [env.query / "pipe.jpg", env.query / "sub" / "pipe2.png"]
    for f in fifos:
        os.mkfifo(f)
    before = snapshot(env.query, env.support)
    r: CliResult = _files_run_unblocked(
        fifos, lambda: run_cli(capsys, *env.label_args(tmp_path / "out.csv")))
    assert r.code == 0, r.err
    rows = _rows_by_path(tmp_path / "out.csv")
    for rel in ("pipe.jpg", "sub/pipe2.png"):
        assert rows[rel]["status"] == "error" and rows[rel]["error"] == "not a regular file"
    assert snapshot(env.query, env.support) == before


# -- defects 6b, 7, 12 (metadata): checkpoints that lie -----------------------------------------
TINY_BACKBONE = {"in_channels": 3, "image_size": 32, "hidden": 16}
CHECKPOINT_CASES: dict[str, tuple[dict[str, Any], str]] = {
    "hidden4096": ({"model": {"backbone_config": {**TINY_BACKBONE, "hidden": 4096}}},
                   "the weights do not fit the model it describes (tensor "
                   "backbone.encoder.0.0.weight is (16, 3, 3, 3) in the file, the model needs "
                   "(4096, 3, 3, 3))"),
    "size12000": ({"model": {"backbone_config": {**TINY_BACKBONE, "image_size": 12000}},
                   "preprocess": {"image_size": 12000}},
                  "'image_size' must be an integer from 8 to 1024, not 12000"),
    "channels7": ({"preprocess": {"channels": 7}}, "'channels' must be 1 or 3, not 7"),
    "size-5": ({"preprocess": {"image_size": -5}},
               "'image_size' must be an integer from 8 to 1024, not -5"),
    "model-list": ({"model": ["protonet"]}, "'model' must be an object, not list"),
    "preprocess-list": ({"preprocess": [32, 3]}, "preprocess must be an object, not list"),
    "resize-unknown": ({"preprocess": {"resize": "zoom"}}, "'resize' must be one of"),
    "nan": ({}, "checkpoint weights contain NaN/Inf (tensor backbone.encoder.2.0.weight)"),
}


@pytest.mark.parametrize("case", sorted(CHECKPOINT_CASES))
def test_files_lying_checkpoint_is_one_line_exit_2(tmp_path: Path, case: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    env = LabelEnv.make(tmp_path, per_class=1)
    meta, expected = CHECKPOINT_CASES[case]
    tensors = None
    if case == "nan":
        from safetensors.torch import load_file

        w = load_file(str(env.ckpt))["backbone.encoder.2.0.weight"].clone()
        w.view(-1)[3] = float("nan")
        tensors = {"backbone.encoder.2.0.weight": w}
    bad = tamper_checkpoint(env.ckpt, tmp_path / f"{case}.safetensors", meta, tensors)
    args = env.label_args(tmp_path / "out.csv")
    args[args.index(env.ckpt)] = bad
    before = snapshot(env.query, env.support, bad)
    mem, t0 = peak_rss_bytes(), time.perf_counter()
    r = run_cli(capsys, *args)
    grew, took = peak_rss_bytes() - mem, time.perf_counter() - t0
    assert r.code == 2, (r.out, r.err)
    assert r.err.startswith(f"error: {bad}: ") and r.err.count("\n") == 1, r.err
    assert expected in r.err and "Traceback" not in r.err, r.err
    assert not (tmp_path / "out.csv").exists()
    assert snapshot(env.query, env.support, bad) == before
    assert took < 5 and grew < 300 << 20, (took, grew >> 20)  # hidden=4096 took 2 GB


# -- the planted files that already work, all at once through the CLI ---------------------------
@needs_fifo
def test_files_planted_files_through_the_cli(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Truncated, bomb, not-an-image, empty, CMYK, 16-bit, palette, EXIF, unicode names,
    symlink loops (a folder loop and a file loop), a dangling symlink and a FIFO: one row per
    image file, the expected status and reason, exit 0, no input changed."""
    env = LabelEnv.make(tmp_path)
    truth = make_queries(env.query, 2)  # (same files LabelEnv wrote; returns their classes)
    bad = write_bad_files(env.query)
    odd = [f"odd/{n}" for n in write_odd_files(env.query / "odd")]
    (env.query / "loop").symlink_to(".")  # a folder loop: not followed
    (env.query / "self.jpg").symlink_to("self.jpg")  # a file loop
    (env.query / "dangling.png").symlink_to("nowhere.png")
    os.mkfifo(env.query / "pipe.jpg")
    # (the engine's stat before decoding says "cannot read file" for both links)
    bad.update({"self.jpg": "cannot read file", "dangling.png": "", "pipe.jpg":
                "not a regular file"})
    before = snapshot(env.query, env.support)
    r: CliResult = _files_run_unblocked(
        [env.query / "pipe.jpg"],
        lambda: run_cli(capsys, *env.label_args(tmp_path / "out.csv", "--unknown-threshold",
                                                "0")))
    assert r.code == 0, r.err
    rows = _rows_by_path(tmp_path / "out.csv")
    assert sorted(rows) == sorted([*truth, *bad, *odd])  # one row per image file
    for rel, reason in bad.items():
        assert rows[rel]["status"] == "error" and reason in rows[rel]["error"], rows[rel]
    assert rows["dangling.png"]["error"] in ("file not found", "cannot read file")
    for rel in [*truth, *odd]:
        assert rows[rel]["status"] == "ok" and not rows[rel]["error"], rows[rel]
    for rel, cls in truth.items():
        assert rows[rel]["label"] == cls, rows[rel]
    assert rows["odd/cmyk.jpg"]["label"] == "red"
    assert f"errors {len(bad)} of {len(rows)} images" in r.out
    assert snapshot(env.query, env.support) == before


# -- defect 12: project files (project_io level) ----------------------------------------------
PROJECT_CASES = {
    "classes-str": ('{"format": "fewshot-studio-project/1", "classes": "abc"}',
                    "'classes' must be a list, not str"),
    "class-no-name": ('{"format": "fewshot-studio-project/1", "classes": [{"color": "#fff"}]}',
                      "class 1 has no name"),
    "settings-list": ('{"format": "fewshot-studio-project/1", "settings": [1]}',
                      "'settings' must be an object, not list"),
    "deep": ("[" * 200_000 + "]" * 200_000, "nested too deeply"),
    "not-json": ("{nope", "cannot read the project"),
}


@pytest.mark.parametrize("case", sorted(PROJECT_CASES))
def test_files_bad_project_file_is_a_user_error(tmp_path: Path, case: str) -> None:
    text, expected = PROJECT_CASES[case]
    path = tmp_path / f"{case}.fsproj"
    path.write_text(text)
    before = snapshot(path)
    with pytest.raises(UserError) as e:
        pio.load_project(path)
    assert expected in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)
    assert snapshot(path) == before


def test_files_large_project_loads_fast(tmp_path: Path) -> None:
    """100,000 example and correction paths (a 12 MB file) load in about a second (they took
    about 7 s: one Path.resolve, i.e. a dozen lstat calls, per path)."""
    n = 50_000
    doc = {"format": pio.FORMAT, "query_folder": "queries",
           "classes": [{"name": "A", "examples": [f"examples/some/folder/{i:06d}.jpg"
                                                  for i in range(n)]}],
           "corrections": {f"queries/batch/photos/{i:07d}.jpg": "A" for i in range(n)}}
    path = tmp_path / "big.fsproj"
    path.write_text(json.dumps(doc, indent=2))
    t0 = time.perf_counter()
    project = pio.load_project(path)
    took = time.perf_counter() - t0
    assert len(project.corrections) == n and len(project.classes[0].examples) == n
    assert took < 3.0, took
    with open(tmp_path / "huge.fsproj", "wb") as f:
        f.truncate(pio.MAX_PROJECT_BYTES + (1 << 20))
    with pytest.raises(UserError, match="file too large"):
        pio.load_project(tmp_path / "huge.fsproj")
    assert torch  # (imported at the top for the checkpoint cases)


# ------------------------------------------------------------------------------------------------
# Leftover temp files (defect 16)
# ------------------------------------------------------------------------------------------------

def _aged_file(path: Path, data: bytes, seconds: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    then = time.time() - seconds
    os.utime(path, (then, then))
    return path


def test_tempfiles_stale_temps_are_removed_on_the_next_label_run(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Stale temp files of ours in the user cache directory's onnx folder (a killed export's,
    0 bytes, of another checkpoint too) and beside the --out file are gone after a ``label``
    run; a fresh one (a concurrent run's) and the user's own hidden files stay, unchanged."""
    from fewshot_studio.paths import user_cache_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))  # a fresh onnx folder
    onnx = user_cache_dir() / "onnx"
    env = LabelEnv.make(tmp_path / "env")
    work = tmp_path / "work"
    cache, out = work / "cache.sqlite", work / "labels.csv"
    old = STALE_TEMP_AGE_S + 120
    stale = [_aged_file(onnx / ".0123abcd.onnx.x7k2_q9z.tmp", b"", old),
             _aged_file(onnx / ".0123abcd.int8.onnx.ab12cd34.tmp", b"", old),
             _aged_file(work / ".labels.csv.m3n4b5v6.tmp", b"path,label\n", old)]
    fresh = _aged_file(onnx / ".feedbeef.onnx.qwertyui.tmp", b"", 1)
    users = [_aged_file(onnx / ".notes.tmp", b"my notes", old),
             _aged_file(work / ".labels.csv.tmp", b"mine", old),
             _aged_file(work / ".other.csv.m3n4b5v6.tmp", b"not beside --out", old)]
    before = snapshot(env.support, env.query, env.ckpt, *users)

    r = run_cli(capsys, *env.label_args(out, "--backend", "onnxruntime", cache=cache))

    assert r.code == 0, r.err
    assert out.is_file() and list(onnx.glob("*.onnx")) and not (work / "onnx").exists()
    assert [p for p in stale if p.exists()] == []
    assert fresh.exists()
    assert snapshot(env.support, env.query, env.ckpt, *users) == before
