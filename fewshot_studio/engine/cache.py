"""The embedding cache: one SQLite database (WAL) of per-image features.

A row is keyed by ``(model, path)`` and valid while the file's ``size`` and ``mtime_ns`` are
unchanged; ``model`` is the checkpoint identity (see :meth:`EmbeddingCache.checkpoint_identity`)
plus the engine's feature-format version, so another checkpoint, or the same file retrained,
never reads stale features. The value is the feature blob (float16 when it fits, else
float32) with its shape, or a decode error reason (for files whose content is bad: an
unreadable file is not cached, since chmod does not change mtime).

Several processes (the GUI and the CLI) may share one file: WAL + a busy timeout.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fewshot_studio.errors import UserError

CACHE_FILENAME = "embeddings.sqlite"
FEATURE_FORMAT = "v1"  # bump when preprocessing/decoding changes what an embedding means
_FP16_MAX = 60000.0
_SQL_CHUNK = 500  # SQLite host-parameter budget per IN (...) query

# Reasons that depend on the file system, not the content: never cached.
_TRANSIENT_REASONS = ("permission denied", "file not found", "cannot read file", "is a directory")


@dataclass(frozen=True)
class FileKey:
    """A file's identity for the cache: absolute path, size in bytes, mtime in ns."""

    path: str
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: str | os.PathLike[str]) -> FileKey:
        """Stat ``path`` (raises OSError)."""
        p = os.path.abspath(os.fspath(path))
        st = os.stat(p)
        return cls(p, st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class CacheEntry:
    """A cached feature ``(*feature_shape)`` or, when ``feature`` is None, an ``error``."""

    feature: np.ndarray | None
    error: str = ""


def is_cacheable_error(reason: str) -> bool:
    """Content errors (truncated, not an image...) are cached; file-system errors are not."""
    return not reason.startswith(_TRANSIENT_REASONS)


def encode_feature(feature: np.ndarray, allow_fp16: bool = True) -> tuple[str, str, bytes]:
    """``(dtype, shape, blob)`` of a feature; float16 when every value fits."""
    a = np.asarray(feature)
    if allow_fp16 and np.isfinite(a).all() and (a.size == 0 or float(np.abs(a).max()) < _FP16_MAX):
        a = a.astype(np.float16)
    else:
        a = a.astype(np.float32)
    return a.dtype.str, ",".join(map(str, a.shape)), np.ascontiguousarray(a).tobytes()


def decode_feature(dtype: str, shape: str, blob: bytes) -> np.ndarray:
    dims = tuple(int(s) for s in shape.split(",") if s)
    return np.frombuffer(blob, dtype=np.dtype(dtype)).reshape(dims)


class EmbeddingCache:
    """Per-image features in SQLite. ``path`` defaults to
    ``paths.user_cache_dir()/embeddings.sqlite``; a project may keep its own beside it.

    Thread-safe (one connection behind a lock); the engine uses it from one thread.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None,
                 allow_fp16: bool = True) -> None:
        if path is None:
            from fewshot_studio.paths import user_cache_dir

            path = user_cache_dir() / CACHE_FILENAME
        self.path = Path(path)
        self.allow_fp16 = allow_fp16
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create the cache folder {self.path.parent}: "
                            f"{e.strerror or e}") from None
        try:
            self._conn = self._open()
        except sqlite3.DatabaseError:
            # Not a database (damaged, or some other file): start a fresh cache.
            for suffix in ("", "-wal", "-shm"):
                Path(str(self.path) + suffix).unlink(missing_ok=True)
            self._conn = self._open()

    def _open(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(str(self.path), timeout=30.0, check_same_thread=False,
                                   isolation_level=None)
        except sqlite3.OperationalError as e:
            raise UserError(f"cannot open the embedding cache {self.path}: {e}") from None
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(
                "CREATE TABLE IF NOT EXISTS embeddings ("
                " model TEXT NOT NULL, path TEXT NOT NULL, size INTEGER NOT NULL,"
                " mtime_ns INTEGER NOT NULL, dtype TEXT, shape TEXT, data BLOB, error TEXT,"
                " PRIMARY KEY (model, path))"
            )
            conn.execute(
                "CREATE TABLE IF NOT EXISTS checkpoints ("
                " path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,"
                " identity TEXT NOT NULL)"
            )
        except sqlite3.DatabaseError:
            conn.close()
            raise
        return conn

    # -- checkpoint identity ---------------------------------------------------------------
    def checkpoint_identity(self, checkpoint: str | os.PathLike[str]) -> str:
        """SHA-256 of the checkpoint file's bytes, computed once per (path, size, mtime) and
        remembered in the database."""
        key = FileKey.of(checkpoint)
        with self._lock:
            row = self._conn.execute(
                "SELECT size, mtime_ns, identity FROM checkpoints WHERE path=?", (key.path,)
            ).fetchone()
        if row is not None and row[0] == key.size and row[1] == key.mtime_ns:
            return str(row[2])
        h = hashlib.sha256()
        with open(key.path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        ident = h.hexdigest()
        with self._lock:
            self._conn.execute(
                "INSERT OR REPLACE INTO checkpoints (path, size, mtime_ns, identity) "
                "VALUES (?, ?, ?, ?)", (key.path, key.size, key.mtime_ns, ident))
        return ident

    # -- features --------------------------------------------------------------------------
    def lookup(self, model: str, keys: Sequence[FileKey]) -> dict[str, CacheEntry]:
        """Valid entries for ``keys`` (size and mtime must match), by absolute path."""
        out: dict[str, CacheEntry] = {}
        by_path = {k.path: k for k in keys}
        paths = list(by_path)
        with self._lock:
            for i in range(0, len(paths), _SQL_CHUNK):
                chunk = paths[i:i + _SQL_CHUNK]
                marks = ",".join("?" * len(chunk))
                rows = self._conn.execute(
                    f"SELECT path, size, mtime_ns, dtype, shape, data, error FROM embeddings "
                    f"WHERE model=? AND path IN ({marks})", (model, *chunk)).fetchall()
                for path, size, mtime_ns, dtype, shape, data, error in rows:
                    k = by_path[path]
                    if size != k.size or mtime_ns != k.mtime_ns:
                        continue
                    if data is None:
                        out[path] = CacheEntry(None, error or "unreadable")
                    else:
                        out[path] = CacheEntry(decode_feature(dtype, shape, data))
        return out

    def store(self, model: str,
              items: Iterable[tuple[FileKey, np.ndarray | None, str]]) -> None:
        """Insert or replace ``(key, feature or None, error)`` rows in one transaction.
        File-system errors (see :func:`is_cacheable_error`) are skipped."""
        rows = []
        for key, feature, error in items:
            if feature is None:
                if not is_cacheable_error(error):
                    continue
                rows.append((model, key.path, key.size, key.mtime_ns, None, None, None, error))
            else:
                dtype, shape, blob = encode_feature(feature, self.allow_fp16)
                rows.append((model, key.path, key.size, key.mtime_ns, dtype, shape, blob, None))
        if not rows:
            return
        with self._lock:
            self._conn.execute("BEGIN")
            try:
                self._conn.executemany(
                    "INSERT OR REPLACE INTO embeddings "
                    "(model, path, size, mtime_ns, dtype, shape, data, error) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    def count(self, model: str | None = None) -> int:
        """Number of cached rows (for one model, or all)."""
        with self._lock:
            if model is None:
                row = self._conn.execute("SELECT COUNT(*) FROM embeddings").fetchone()
            else:
                row = self._conn.execute(
                    "SELECT COUNT(*) FROM embeddings WHERE model=?", (model,)).fetchone()
        return int(row[0])

    def clear(self, model: str | None = None) -> None:
        """Forget every row (of one model, or all)."""
        with self._lock:
            if model is None:
                self._conn.execute("DELETE FROM embeddings")
            else:
                self._conn.execute("DELETE FROM embeddings WHERE model=?", (model,))

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> EmbeddingCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
