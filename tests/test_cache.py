"""The SQLite embedding cache."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from fewshot_studio.engine.cache import EmbeddingCache, FileKey


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
        np.testing.assert_allclose(got[k1.path].feature, f1, atol=2e-3)  # float16
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


def test_wal_mode_and_damaged_file_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    with EmbeddingCache(path):
        pass
    mode = sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode.lower() == "wal"
    path.write_bytes(b"this is not a database" * 100)
    with EmbeddingCache(path) as cache:
        k = _file(tmp_path, "a.jpg")
        cache.store("m", [(k, np.ones(2, np.float32), "")])
        assert cache.count() == 1


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
    from fewshot_studio.errors import UserError

    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="cache"):
        EmbeddingCache(blocker / "sub" / "c.sqlite")
