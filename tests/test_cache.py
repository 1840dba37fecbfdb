"""The SQLite embedding cache."""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from bad_input_helpers import corrupt_sqlite_pages

from fewshot_studio.data.scan import scan_images
from fewshot_studio.engine.cache import (
    FEATURE_FORMAT,
    SQLITE_MAGIC,
    EmbeddingCache,
    FileKey,
    encode_feature,
)
from fewshot_studio.errors import UserError


def _file(tmp_path: Path, name: str, data: bytes = b"x" * 10) -> FileKey:
    p = tmp_path / name
    p.write_bytes(data)
    return FileKey.of(p)


def test_round_trip_and_validity(tmp_path: Path) -> None:
    k1, k2 = _file(tmp_path, "a.jpg"), _file(tmp_path, "b.jpg")
    f1 = np.linspace(-3, 3, 64, dtype=np.float32).reshape(4, 4, 4)
    with EmbeddingCache(tmp_path / "c.sqlite") as cache:
        cache.store("m1", [(k1, f1, ""), (k2, None, "truncated file")])
        got = cache.lookup("m1", [k1, k2])
        assert got[k1.path].feature is not None
        assert got[k1.path].feature.shape == (4, 4, 4)
        np.testing.assert_array_equal(got[k1.path].feature, f1)  # float32, exactly
        assert got[k1.path].feature.dtype == np.float32
        assert got[k2.path].feature is None and got[k2.path].error == "truncated file"
        assert cache.lookup("m2", [k1, k2]) == {}  # another checkpoint
        stale = FileKey(k1.path, k1.size, k1.mtime_ns + 1)
        assert cache.lookup("m1", [stale]) == {}  # mtime changed
        resized = FileKey(k1.path, k1.size + 1, k1.mtime_ns)
        assert cache.lookup("m1", [resized]) == {}
        assert cache.count("m1") == 2 and cache.count() == 2
    with EmbeddingCache(tmp_path / "c.sqlite") as cache:  # persisted
        assert set(cache.lookup("m1", [k1, k2])) == {k1.path, k2.path}
        cache.clear("m1")
        assert cache.count() == 0


def test_large_values_stay_float32_and_transient_errors_not_cached(tmp_path: Path) -> None:
    k1, k2 = _file(tmp_path, "a.jpg"), _file(tmp_path, "b.jpg")
    big = np.array([1e6, -2.5e5, 1.0], np.float32)
    with EmbeddingCache(tmp_path / "c.sqlite") as cache:
        cache.store("m", [(k1, big, ""), (k2, None, "permission denied")])
        got = cache.lookup("m", [k1, k2])
        assert got[k1.path].feature.dtype == np.float32
        np.testing.assert_array_equal(got[k1.path].feature, big)
        assert k2.path not in got


def test_many_keys_in_one_lookup(tmp_path: Path) -> None:
    keys = [FileKey(f"/x/{i}.jpg", i, i) for i in range(1200)]  # beyond one IN (...) chunk
    with EmbeddingCache(tmp_path / "c.sqlite") as cache:
        cache.store("m", [(k, np.full(3, i, np.float32), "") for i, k in enumerate(keys)])
        got = cache.lookup("m", keys)
    assert len(got) == 1200 and got["/x/1199.jpg"].feature[0] == 1199


def test_wal_mode_and_damaged_cache_is_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    with EmbeddingCache(path):
        pass
    mode = sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode.lower() == "wal"
    damaged = SQLITE_MAGIC + b"\x07" * 5000  # a SQLite header, then garbage
    path.write_bytes(damaged)
    with EmbeddingCache(path) as cache:
        assert cache.failures == 0 and cache.moved_aside is not None
        assert cache.moved_aside.name.startswith("c.sqlite.corrupt-")
        assert cache.moved_aside.read_bytes() == damaged  # renamed, never deleted
        k = _file(tmp_path, "a.jpg")
        cache.store("m", [(k, np.ones(2, np.float32), "")])
        assert cache.count() == 1  # a fresh cache


def test_checkpoint_identity_follows_content(tmp_path: Path) -> None:
    ck = tmp_path / "model.safetensors"
    ck.write_bytes(b"weights-1")
    with EmbeddingCache(tmp_path / "c.sqlite") as cache:
        a = cache.checkpoint_identity(ck)
        assert a == cache.checkpoint_identity(ck) and len(a) == 64
        ck.write_bytes(b"weights-2")
        st = ck.stat()
        os.utime(ck, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        b = cache.checkpoint_identity(ck)
        assert b != a


def test_two_connections_share_the_file(tmp_path: Path) -> None:
    k = _file(tmp_path, "a.jpg")
    path = tmp_path / "c.sqlite"
    with EmbeddingCache(path) as one, EmbeddingCache(path) as two:
        one.store("m", [(k, np.ones(2, np.float32), "")])
        assert k.path in two.lookup("m", [k])


def test_unwritable_cache_folder_is_a_user_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="cache"):
        EmbeddingCache(blocker / "sub" / "c.sqlite")


# -- issue 12: float32 features (defect 14) ------------------------------------------------
def test_features_round_trip_exactly_and_old_rows_are_not_read(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    k1, k2 = _file(tmp_path, "a.jpg"), _file(tmp_path, "b.jpg")
    f1 = rng.normal(0, 1, (16, 2, 2)).astype(np.float32)  # values float16 cannot hold
    assert not np.array_equal(f1.astype(np.float16).astype(np.float32), f1)
    assert FEATURE_FORMAT != "v1"  # v1 rows held float16 features
    assert encode_feature(f1)[0] == np.dtype(np.float32).str
    with EmbeddingCache(tmp_path / "c.sqlite") as cache:
        cache.store("m", [(k1, f1, "")])
        got = cache.lookup("m", [k1])[k1.path].feature
        assert got is not None and got.dtype == np.float32
        np.testing.assert_array_equal(got, f1)
        # a float16 row (as an old version wrote) is recomputed, never served
        half = f1.astype(np.float16)
        with cache._lock:
            assert cache._conn is not None
            cache._conn.execute(
                "INSERT INTO embeddings VALUES (?, ?, ?, ?, ?, ?, ?, NULL)",
                ("m", k2.path, k2.size, k2.mtime_ns, half.dtype.str, "16,2,2",
                 half.tobytes()))
        assert k2.path not in cache.lookup("m", [k2])


# -- issue 12: a file that is not ours is never changed (defect 1) -------------------------
def _hash(p: Path) -> bytes:
    return hashlib.sha256(p.read_bytes()).digest()


@pytest.mark.parametrize("name, data", [
    ("notes.txt", b"my notes, not a database\n" * 50),
    ("photo.png", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8),
    ("tiny.sqlite", b"SQLite"),  # shorter than the header
])
def test_file_that_is_not_sqlite_is_refused_unchanged(tmp_path: Path, name: str,
                                                      data: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(data)
    before = sorted(tmp_path.iterdir())
    with pytest.raises(UserError, match="not a SQLite database") as err:
        EmbeddingCache(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert path.read_bytes() == data
    assert sorted(tmp_path.iterdir()) == before  # no -wal, -shm or moved copy


def test_someone_elses_sqlite_database_is_refused_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE users (name TEXT)")
        db.execute("INSERT INTO users VALUES ('ada')")
    db.close()
    digest = _hash(path)
    with pytest.raises(UserError, match="not an embedding cache") as err:
        EmbeddingCache(path)
    assert str(path) in str(err.value)
    assert _hash(path) == digest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.db"]
    # a table named like ours with other columns is someone else's too
    path2 = tmp_path / "other.db"
    with sqlite3.connect(path2) as db:
        db.execute("CREATE TABLE embeddings (id INTEGER, vec BLOB)")
    db.close()
    digest = _hash(path2)
    with pytest.raises(UserError, match="not an embedding cache"):
        EmbeddingCache(path2)
    assert _hash(path2) == digest


def test_empty_file_becomes_a_cache(tmp_path: Path) -> None:
    path = tmp_path / "new.sqlite"
    path.touch()
    k = _file(tmp_path, "a.jpg")
    with EmbeddingCache(path) as cache:
        cache.store("m", [(k, np.ones(2, np.float32), "")])
        assert cache.count() == 1 and cache.failures == 0


def test_folder_or_special_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "dir.sqlite").mkdir()
    with pytest.raises(UserError, match="folder"):
        EmbeddingCache(tmp_path / "dir.sqlite")
    fifo = tmp_path / "pipe.sqlite"
    os.mkfifo(fifo)
    with pytest.raises(UserError, match="not a regular file"):
        EmbeddingCache(fifo)  # never opened: it would block


def test_default_cache_that_is_not_a_cache_is_moved_aside(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    monkeypatch.setattr("fewshot_studio.paths.user_cache_dir", lambda: tmp_path)
    own = tmp_path / "embeddings.sqlite"
    own.write_bytes(b"\0" * 4096)  # the program's own file, zeroed
    with EmbeddingCache() as cache:
        assert cache.path == own and cache.moved_aside is not None
        assert cache.moved_aside.read_bytes() == b"\0" * 4096
        assert cache.count() == 0 and not cache.disabled


# -- issue 12: full disk, read-only file (defect 4) ----------------------------------------
def _fill(cache: EmbeddingCache) -> None:
    """Make the database full: no page may be added (SQLITE_FULL, as on a full disk)."""
    assert cache._conn is not None
    n = cache._conn.execute("PRAGMA page_count").fetchone()[0]
    cache._conn.execute(f"PRAGMA max_page_count = {n}").fetchone()


def test_full_disk_switches_writes_off_with_one_warning(tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture
                                                        ) -> None:
    keys = [FileKey(f"/x/{i}.jpg", i, i) for i in range(60)]
    feats = [(k, np.full(2000, i, np.float32), "") for i, k in enumerate(keys)]
    ck = _file(tmp_path, "ck.bin")
    with EmbeddingCache(tmp_path / "c.sqlite") as cache:
        cache.store("m", feats[:1])
        _fill(cache)
        with caplog.at_level(logging.WARNING, logger="fewshot_studio.engine.cache"):
            cache.store("m", feats[1:30])  # used to raise "cannot rollback"
            cache.store("m", feats[30:])
            assert len(cache.checkpoint_identity(ck.path)) == 64
        assert cache.failures == 1 and cache.read_only
        assert "database or disk is full" in cache.disabled
        assert str(cache.path) in cache.disabled
        assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1
        got = cache.lookup("m", keys)  # what is there still serves
        assert set(got) == {keys[0].path}
    with EmbeddingCache(tmp_path / "c.sqlite") as cache:  # the file is sound
        assert cache.count() == 1 and cache.failures == 0


def test_read_only_cache_is_read_not_written(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.sqlite"
    k1, k2 = _file(tmp_path, "a.jpg"), _file(tmp_path, "b.jpg")
    with EmbeddingCache(path) as cache:
        cache.store("m", [(k1, np.ones(3, np.float32), "")])
    connect = EmbeddingCache._connect

    def refuse_writes(self: EmbeddingCache, read_only: bool) -> sqlite3.Connection:
        if not read_only:  # what opening a read-only file in a read-only folder gives
            raise sqlite3.OperationalError("attempt to write a readonly database")
        return connect(self, read_only)

    monkeypatch.setattr(EmbeddingCache, "_connect", refuse_writes)
    digest = _hash(path)
    with EmbeddingCache(path) as cache:
        assert cache.read_only and cache.failures == 1
        assert "cannot write" in cache.disabled and str(path) in cache.disabled
        assert set(cache.lookup("m", [k1, k2])) == {k1.path}  # reads still help
        cache.store("m", [(k2, np.ones(3, np.float32), "")])  # skipped, no error
        assert len(cache.checkpoint_identity(k2.path)) == 64
    assert _hash(path) == digest


def test_write_error_after_open_is_not_raised(tmp_path: Path) -> None:
    """A file that becomes read-only (or a lock that never frees) while the cache is open."""
    k = _file(tmp_path, "a.jpg")
    with EmbeddingCache(tmp_path / "c.sqlite") as cache:
        assert cache._conn is not None
        cache._conn.execute("PRAGMA query_only = 1")
        cache.store("m", [(k, np.ones(3, np.float32), "")])
        cache.clear()
        assert cache.failures == 1 and "readonly" in cache.disabled


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root writes files whatever their permissions")
def test_read_only_file_and_folder_really(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    path = folder / "c.sqlite"
    k1, k2 = _file(tmp_path, "a.jpg"), _file(tmp_path, "b.jpg")
    with EmbeddingCache(path) as cache:
        cache.store("m", [(k1, np.ones(3, np.float32), "")])
    os.chmod(path, 0o444)
    os.chmod(folder, 0o555)
    try:
        with EmbeddingCache(path) as cache:
            cache.store("m", [(k2, np.ones(3, np.float32), "")])
            assert cache.failures >= 1 and cache.disabled
            assert k1.path in cache.lookup("m", [k1]) or not cache.lookup("m", [k1])
        with EmbeddingCache(folder / "new.sqlite") as cache:  # cannot even be created
            cache.store("m", [(k2, np.ones(3, np.float32), "")])
            assert cache.failures >= 1 and cache.disabled
    finally:
        os.chmod(folder, 0o755)
        os.chmod(path, 0o644)


# -- issue 12: pages damaged in the middle (defect 5) --------------------------------------
def test_damaged_pages_are_moved_aside_and_the_next_open_is_fresh(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    keys = [FileKey(f"/x/{i}.jpg", i, i) for i in range(300)]
    with EmbeddingCache(path) as cache:
        cache.store("m", [(k, np.full(200, i, np.float32), "") for i, k in enumerate(keys)])
    corrupt_sqlite_pages(path)
    damaged = path.read_bytes()
    with EmbeddingCache(path) as cache:  # the header and schema page are fine
        assert cache.lookup("m", keys) == {}  # used to raise "malformed", every run
        assert cache.failures == 1 and "malformed" in cache.disabled
        assert cache.moved_aside is not None and cache.moved_aside.read_bytes() == damaged
        cache.store("m", [(keys[0], np.ones(3, np.float32), "")])  # off: no error
        assert cache.count() == 0
    with EmbeddingCache(path) as cache:  # the next session starts afresh
        assert cache.failures == 0 and not cache.disabled and cache.count() == 0
        cache.store("m", [(keys[0], np.ones(3, np.float32), "")])
        assert cache.count() == 1


def test_damage_found_by_checkpoint_identity(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    ck = _file(tmp_path, "model.bin", b"weights")
    with EmbeddingCache(path) as cache:
        cache.store("m", [(FileKey(f"/x/{i}", i, i), np.ones(300, np.float32), "")
                          for i in range(200)])
        ident = cache.checkpoint_identity(ck.path)
    # damage every page but the first (the schema) and the last
    n = path.stat().st_size // int.from_bytes(path.read_bytes()[16:18], "big")
    corrupt_sqlite_pages(path, range(2, n))
    with EmbeddingCache(path) as cache:
        assert cache.checkpoint_identity(ck.path) == ident  # computed, not read
        assert cache.failures == 1 and cache.moved_aside is not None


# -- issue 12: a cached rerun gives the same results as a fresh run (defect 14) ------------
@pytest.mark.parametrize("fp16_store", [False, True], ids=["fp32-store", "fp16-store"])
def test_cached_rerun_equals_fresh_run_bit_for_bit(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   fp16_store: bool) -> None:
    """The same inputs give the same CSV, cached or not; also when the query features are
    kept as float16 under the memory budget (the rounding applies to both runs alike)."""
    from engine_fixtures import make_checkpoint, make_queries, make_support

    from fewshot_studio.engine import export
    from fewshot_studio.engine.api import LabelSettings
    from fewshot_studio.engine.session import LabelingSession

    if fp16_store:
        monkeypatch.setattr("fewshot_studio.engine.query_store._FP32_BUDGET", 0)
    ckpt = make_checkpoint(tmp_path / "tiny.safetensors")
    support = make_support(tmp_path / "support")
    make_queries(tmp_path / "query", 2)
    queries = scan_images(tmp_path / "query")
    settings = LabelSettings(device="cpu", unknown_threshold=0.0)
    results = []
    for run in ("fresh", "cached"):
        with LabelingSession(ckpt, settings, cache_path=tmp_path / "c.sqlite",
                             backend="torch") as s:
            s.set_support(support)
            for _ in s.run(queries):
                pass
            embedded, hits = s.counters.embedded, s.counters.cache_hits
            assert s._store.feats is not None
            feats = s._store.feats.copy()
            sup = {p: np.array(f) for p, f in s._support.feats.items()}
            out = tmp_path / f"{run}.csv"
            export.write_csv(s.predictions(), out, tmp_path / "query")
        results.append((embedded, hits, feats, sup, out.read_bytes()))
    (e1, h1, f1, s1, csv1), (e2, h2, f2, s2, csv2) = results
    assert e1 == len(queries) + 9 and h1 == 0
    assert e2 == 0 and h2 == len(queries) + 9  # served fully from the cache
    assert f1.dtype == f2.dtype == (np.float16 if fp16_store else np.float32)
    np.testing.assert_array_equal(f1, f2)
    assert s1.keys() == s2.keys()
    for p in s1:
        assert s1[p].dtype == s2[p].dtype == np.float32
        np.testing.assert_array_equal(s1[p], s2[p])
    assert csv1 == csv2
