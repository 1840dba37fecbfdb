"""The embedding cache: one SQLite database (WAL) of per-image features.

A row is keyed by ``(model, path)`` and valid while the file's ``size`` and ``mtime_ns`` are
unchanged; ``model`` is the checkpoint identity (see :meth:`EmbeddingCache.checkpoint_identity`)
plus the engine's feature-format version, so another checkpoint, or the same file retrained,
never reads stale features. The value is the feature blob (float32, exactly what the backend
computed: a cached rerun gives the same results as a fresh run) with its shape, or a decode
error reason (for files whose content is bad: an unreadable file is not cached, since chmod
does not change mtime).

Several processes (the GUI and the CLI) may share one file: WAL + a busy timeout.

The cache never costs a run its work, and never touches a file that is not a cache:

* a given file that is not a SQLite database, or a SQLite database with other tables than
  ours, is refused (:class:`~fewshot_studio.errors.UserError`, the file left as it is);
* a damaged cache (a SQLite file that reads as malformed, at open or at any later call) is
  moved aside to ``<name>.corrupt-<time>`` (never deleted) and the run goes on;
* any other SQLite error (a full disk, a read-only file) switches the cache off for the rest
  of the session (writes only, when reading still works), with one warning: see
  :attr:`EmbeddingCache.disabled` and :attr:`EmbeddingCache.failures`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import quote

import numpy as np

from fewshot_studio.errors import UserError

log = logging.getLogger(__name__)

CACHE_FILENAME = "embeddings.sqlite"
# Bump when preprocessing/decoding changes what an embedding means. v2: float32 features
# (v1 rows held float16, which moved predictions: they are never read).
FEATURE_FORMAT = "v2"
SQLITE_MAGIC = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite database file
_FEATURE_DTYPE = np.dtype(np.float32).str
_SQL_CHUNK = 500  # SQLite host-parameter budget per IN (...) query
_DAMAGE_CODES = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)
_DAMAGE_WORDS = ("malformed", "not a database")

_TABLES = {
    "embeddings": (
        "CREATE TABLE IF NOT EXISTS embeddings ("
        " model TEXT NOT NULL, path TEXT NOT NULL, size INTEGER NOT NULL,"
        " mtime_ns INTEGER NOT NULL, dtype TEXT, shape TEXT, data BLOB, error TEXT,"
        " PRIMARY KEY (model, path))",
        {"model", "path", "size", "mtime_ns", "dtype", "shape", "data", "error"}),
    "checkpoints": (
        "CREATE TABLE IF NOT EXISTS checkpoints ("
        " path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,"
        " identity TEXT NOT NULL)",
        {"path", "size", "mtime_ns", "identity"}),
}

# Reasons that depend on the file system, not the content: never cached.
_TRANSIENT_REASONS = ("permission denied", "file not found", "cannot read file", "is a directory")

T = TypeVar("T")


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


def file_keys(paths: Sequence[str | os.PathLike[str]]) -> list[FileKey | None]:
    """:meth:`FileKey.of` of each path, None where it cannot be stat'ed."""
    keys: list[FileKey | None] = []
    for p in paths:
        try:
            keys.append(FileKey.of(p))
        except OSError:
            keys.append(None)
    return keys


@dataclass(frozen=True)
class CacheEntry:
    """A cached feature ``(*feature_shape)`` or, when ``feature`` is None, an ``error``."""

    feature: np.ndarray | None
    error: str = ""


def is_cacheable_error(reason: str) -> bool:
    """Content errors (truncated, not an image...) are cached; file-system errors are not."""
    return not reason.startswith(_TRANSIENT_REASONS)


def encode_feature(feature: np.ndarray) -> tuple[str, str, bytes]:
    """``(dtype, shape, blob)`` of a feature, as float32 (exact for the backends' output)."""
    a = np.ascontiguousarray(feature, dtype=np.float32)
    return a.dtype.str, ",".join(map(str, a.shape)), a.tobytes()


def decode_feature(dtype: str, shape: str, blob: bytes) -> np.ndarray:
    """The array :func:`encode_feature` stored."""
    dims = tuple(int(s) for s in shape.split(",") if s)
    return np.frombuffer(blob, dtype=np.dtype(dtype)).reshape(dims)


def is_damage(e: sqlite3.Error) -> bool:
    """Whether a SQLite error means the file is damaged (malformed, not a database)."""
    code = getattr(e, "sqlite_errorcode", None)
    if code is not None and (code & 0xFF) in _DAMAGE_CODES:
        return True
    return any(w in str(e) for w in _DAMAGE_WORDS)


class _NotACache(Exception):
    """The file is a SQLite database of someone else (other tables than ours)."""


class EmbeddingCache:
    """Per-image features in SQLite. ``path`` defaults to
    ``paths.user_cache_dir()/embeddings.sqlite``; a project may keep its own beside it.

    Opening checks the file before anything is written to it: a folder, a special file, a
    non-empty file that is not a SQLite database, or a SQLite database with tables that are
    not ours raises :class:`~fewshot_studio.errors.UserError` naming the file (the default
    cache file, which is the program's own, is moved aside instead). A damaged cache is moved
    aside (:attr:`moved_aside`) and a fresh one started.

    A SQLite error later (or a cache that cannot be opened or written) never fails a call:
    the cache is switched off for this object's life (for writes only, when it can still be
    read), :attr:`disabled` says why, :attr:`failures` counts the errors, and one warning is
    logged. A damaged file is moved aside then, so the next session starts afresh.

    Thread-safe (one connection behind a lock); the engine uses it from one thread.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        explicit = path is not None
        if path is None:
            from fewshot_studio.paths import user_cache_dir

            path = user_cache_dir() / CACHE_FILENAME
        self.path = Path(os.path.abspath(os.fspath(path)))
        self.failures = 0
        """SQLite errors met (each one switched the cache, or its writes, off)."""
        self.disabled = ""
        """Why the cache is off or read-only for this session (one line); "" when it works."""
        self.moved_aside: Path | None = None
        """Where a damaged cache file was moved (renamed, never deleted); None if none."""
        self.read_only = False
        """True when features are read from the cache but not written to it."""
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._immutable = False  # opened read-only as an immutable file: never moved aside
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise UserError(f"cannot create the cache folder {self.path.parent}: "
                            f"a file is in the way") from None
        except OSError as e:
            self._switch_off(f"cannot create the cache folder {self.path.parent} "
                             f"({e.strerror or e})", writes_only=False)
            return
        self._start(explicit)

    # -- opening ---------------------------------------------------------------------------
    def _start(self, explicit: bool) -> None:
        """Open the database, after checking that the file is a cache (see the class doc)."""
        for _ in range(2):
            try:
                self._check_file()
                self._conn = self._open()
                return
            except _NotACache as e:
                if explicit:
                    raise UserError(f"{e}; it is left unchanged: choose another cache "
                                    f"file") from None
                why = str(e)
            except sqlite3.Error as e:
                if not is_damage(e):
                    self._open_read_only(e)
                    return
                why = f"the embedding cache {self.path} is damaged ({e})"
            if not self._set_aside(why):
                return
            log.warning("%s; moved it aside to %s and started a fresh cache", why,
                        self.moved_aside)
        self._switch_off(f"cannot start a fresh embedding cache {self.path}", writes_only=False)

    def _check_file(self) -> None:
        """Raise _NotACache when ``path`` holds something that is not a SQLite database (an
        empty or missing file is fine), UserError for a folder or a special file."""
        try:
            st = os.stat(self.path)
        except OSError:
            return  # missing (or unreachable: SQLite says why)
        if stat.S_ISDIR(st.st_mode):
            raise UserError(f"the embedding cache {self.path} is a folder: give a file")
        if not stat.S_ISREG(st.st_mode):
            raise UserError(f"the embedding cache {self.path} is not a regular file")
        if st.st_size == 0:
            return
        try:
            with open(self.path, "rb") as f:
                head = f.read(len(SQLITE_MAGIC))
        except OSError:
            return  # unreadable: SQLite cannot open it either, and the cache is switched off
        if head != SQLITE_MAGIC:
            raise _NotACache(f"{self.path} is not an embedding cache (not a SQLite database)")

    def _connect(self, read_only: bool) -> sqlite3.Connection:
        """A connection to ``path`` (``read_only``: opened with ``mode=ro``, never creates;
        ``immutable`` too when :attr:`_immutable`, for a WAL file in a read-only folder)."""
        if read_only:
            uri = f"file:{quote(str(self.path))}?mode=ro" + (
                "&immutable=1" if self._immutable else "")
            return sqlite3.connect(uri, uri=True, timeout=30.0, check_same_thread=False,
                                   isolation_level=None)
        return sqlite3.connect(str(self.path), timeout=30.0, check_same_thread=False,
                               isolation_level=None)

    def _open(self, read_only: bool = False) -> sqlite3.Connection:
        """Connect, check the schema is ours (nothing is written before), then set WAL and
        create the tables (unless ``read_only``)."""
        conn = self._connect(read_only)
        try:
            names = {str(n) for (n,) in conn.execute(
                "SELECT name FROM sqlite_master WHERE name NOT LIKE 'sqlite\\_%' ESCAPE '\\'")}
            if names and "embeddings" not in names:
                raise _NotACache(f"{self.path} is a SQLite database but not an embedding "
                                 f"cache (tables: {', '.join(sorted(names)[:5])})")
            for table, (_, columns) in _TABLES.items():
                if table in names:
                    have = {str(r[1]) for r in conn.execute(f"PRAGMA table_info({table})")}
                    if not columns <= have:
                        raise _NotACache(f"{self.path} is a SQLite database but not an "
                                         f"embedding cache (table {table} differs)")
            if read_only:
                if not set(_TABLES) <= names:
                    raise sqlite3.OperationalError("read-only and not yet a cache")
            else:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                for create, _ in _TABLES.values():
                    conn.execute(create)
        except BaseException:
            conn.close()
            raise
        return conn

    def _open_read_only(self, why: sqlite3.Error) -> None:
        """After the normal open failed with ``why``: read what is there, write nothing (a
        read-only file; in a read-only folder, where SQLite cannot make the WAL's shared
        memory file, as an immutable file); else the cache is off."""
        for immutable in (False, True):
            self._immutable = immutable
            try:
                self._conn = self._open(read_only=True)
            except (sqlite3.Error, _NotACache):
                continue
            self._switch_off(f"cannot write the embedding cache {self.path} ({why})",
                             writes_only=True)
            return
        self._immutable = False
        self._switch_off(f"cannot open the embedding cache {self.path} ({why})",
                         writes_only=False)

    def _set_aside(self, why: str) -> bool:
        """Close, then rename the damaged file (and its -wal, -shm) to
        ``<name>.corrupt-<time>`` (:attr:`moved_aside`); never deletes. When it cannot be
        renamed the cache is off (with ``why``) and False is returned."""
        self._drop_conn()
        stamp = time.strftime("%Y%m%d-%H%M%S")
        n = 0
        while True:
            target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}"
                                         + (f"-{n}" if n else ""))
            if not any(os.path.lexists(str(target) + s) for s in ("", "-wal", "-shm")):
                break
            n += 1
        try:
            os.rename(self.path, target)
            for suffix in ("-wal", "-shm"):
                side = Path(str(self.path) + suffix)
                if side.exists():
                    os.rename(side, str(target) + suffix)
        except OSError as e:
            self._switch_off(f"{why}; cannot move it aside ({e.strerror or e})",
                             writes_only=False)
            return False
        self.moved_aside = target
        return True

    # -- failures --------------------------------------------------------------------------
    def _switch_off(self, why: str, writes_only: bool) -> None:
        """Count a failure and stop using the cache (or only writing it); warn the first
        time. Call with the lock held (or before the cache is shared)."""
        self.failures += 1
        if writes_only:
            self.read_only = True
        else:
            self._drop_conn()
        if not self.disabled:
            self.disabled = why + ("; features are read from it but new ones are not saved"
                                   if writes_only else "; the cache is off for this run")
            log.warning("%s", self.disabled)

    def _fail(self, e: sqlite3.Error, doing: str, write: bool) -> None:
        """A SQLite error while ``doing``: move a damaged file aside, switch the cache off
        (writes only for a write error on a sound file)."""
        if is_damage(e) and not self._immutable:
            why = f"the embedding cache {self.path} is damaged ({e})"
            if self._set_aside(why):
                self._switch_off(f"{why}; moved it aside to {self.moved_aside}",
                                 writes_only=False)
            return
        self._switch_off(f"cannot {doing} the embedding cache {self.path} ({e})",
                         writes_only=write)

    def _read(self, doing: str, fn: Callable[[sqlite3.Connection], T], default: T) -> T:
        """``fn(conn)`` under the lock; ``default`` when the cache is off or fails."""
        with self._lock:
            if self._conn is None:
                return default
            try:
                return fn(self._conn)
            except sqlite3.Error as e:
                self._fail(e, doing, write=False)
                return default

    def _write(self, doing: str, sql: str, rows: Sequence[tuple[object, ...]]) -> None:
        """``executemany(sql, rows)`` in one transaction (rolled back on error, if SQLite has
        not already done so); nothing when the cache is off or read-only."""
        with self._lock:
            conn = self._conn
            if conn is None or self.read_only or not rows:
                return
            try:
                conn.execute("BEGIN")
                conn.executemany(sql, rows)
                conn.execute("COMMIT")
            except sqlite3.Error as e:
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                self._fail(e, doing, write=True)
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    # -- checkpoint identity ---------------------------------------------------------------
    def checkpoint_identity(self, checkpoint: str | os.PathLike[str]) -> str:
        """SHA-256 of the checkpoint file's bytes, computed once per (path, size, mtime) and
        remembered in the database (when it works)."""
        key = FileKey.of(checkpoint)
        row = self._read("read", lambda c: c.execute(
            "SELECT size, mtime_ns, identity FROM checkpoints WHERE path=?", (key.path,)
        ).fetchone(), None)
        if row is not None and row[0] == key.size and row[1] == key.mtime_ns:
            return str(row[2])
        h = hashlib.sha256()
        with open(key.path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        ident = h.hexdigest()
        self._write("write", "INSERT OR REPLACE INTO checkpoints (path, size, mtime_ns, "
                    "identity) VALUES (?, ?, ?, ?)", [(key.path, key.size, key.mtime_ns, ident)])
        return ident

    # -- features --------------------------------------------------------------------------
    def lookup(self, model: str, keys: Sequence[FileKey]) -> dict[str, CacheEntry]:
        """Valid entries for ``keys`` (size and mtime must match), by absolute path; {} when
        the cache is off."""
        by_path = {k.path: k for k in keys}
        paths = list(by_path)

        def query(conn: sqlite3.Connection) -> dict[str, CacheEntry]:
            out: dict[str, CacheEntry] = {}
            for i in range(0, len(paths), _SQL_CHUNK):
                chunk = paths[i:i + _SQL_CHUNK]
                marks = ",".join("?" * len(chunk))
                rows = conn.execute(
                    f"SELECT path, size, mtime_ns, dtype, shape, data, error FROM embeddings "
                    f"WHERE model=? AND path IN ({marks})", (model, *chunk)).fetchall()
                for path, size, mtime_ns, dtype, shape, data, error in rows:
                    k = by_path[path]
                    if size != k.size or mtime_ns != k.mtime_ns:
                        continue
                    if data is None:
                        out[path] = CacheEntry(None, error or "unreadable")
                    elif dtype == _FEATURE_DTYPE:  # anything else: not ours, recompute
                        out[path] = CacheEntry(decode_feature(dtype, shape, data))
            return out

        return self._read("read", query, {})

    def store(self, model: str,
              items: Iterable[tuple[FileKey, np.ndarray | None, str]]) -> None:
        """Insert or replace ``(key, feature or None, error)`` rows in one transaction.
        File-system errors (see :func:`is_cacheable_error`) are skipped. A failure switches
        the cache's writes off (see the class doc); it never raises a SQLite error."""
        rows = []
        for key, feature, error in items:
            if feature is None:
                if not is_cacheable_error(error):
                    continue
                rows.append((model, key.path, key.size, key.mtime_ns, None, None, None, error))
            else:
                dtype, shape, blob = encode_feature(feature)
                rows.append((model, key.path, key.size, key.mtime_ns, dtype, shape, blob, None))
        self._write("write", "INSERT OR REPLACE INTO embeddings "
                    "(model, path, size, mtime_ns, dtype, shape, data, error) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)

    def count(self, model: str | None = None) -> int:
        """Number of cached rows (for one model, or all); 0 when the cache is off."""
        if model is None:
            return int(self._read("read", lambda c: c.execute(
                "SELECT COUNT(*) FROM embeddings").fetchone()[0], 0))
        return int(self._read("read", lambda c: c.execute(
            "SELECT COUNT(*) FROM embeddings WHERE model=?", (model,)).fetchone()[0], 0))

    def clear(self, model: str | None = None) -> None:
        """Forget every row (of one model, or all)."""
        if model is None:
            self._write("clear", "DELETE FROM embeddings", [()])
        else:
            self._write("clear", "DELETE FROM embeddings WHERE model=?", [(model,)])

    def close(self) -> None:
        with self._lock:
            self._drop_conn()

    def _drop_conn(self) -> None:
        """Close the connection (errors ignored); the cache is off until reopened."""
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            self._conn = None

    def __enter__(self) -> EmbeddingCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
