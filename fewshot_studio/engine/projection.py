"""2-D projections of pooled image features, for the embedding map.

Two methods, one entry point (:func:`project_2d`):

* ``"pca"``: the top two principal components (pure numpy: the eigenvectors of the
  ``(C, C)`` covariance). Milliseconds at 20,000 points; linear, so clusters that differ in
  many directions overlap.
* ``"umap"``: UMAP (McInnes et al. 2018, the ``umap-learn`` package) on the top
  :data:`UMAP_PCA_DIMS` principal components: separates clusters far better, but costs tens
  of seconds at 20,000 points (and numba's compilation on first use). Imported lazily, only
  when installed; never a dependency.

``"auto"`` is UMAP where installed, else PCA. Measured at 20,000 points, 10 clusters, on 2
cores of a loaded machine (2026-12-04, umap-learn 0.5.12; three runs): PCA 0.06 s (64-d
features) and 0.2-2.4 s (512-d: its eigendecomposition suffers most from the load); UMAP
8-26 s, and 85-130 s on its first call in a process (numba compiling), no faster unseeded
with 2 jobs (26 s). Hence the GUI shows the PCA map at once and replaces it with UMAP's when
that is done; PCA is also the fallback where UMAP is not installed. The GUI runs UMAP in a
child process (:class:`ProjectionProcess`): a thread inside numba's compiler cannot be
stopped, a process can, so closing the window never waits on a projection.
"""

from __future__ import annotations

import contextlib
import importlib.util
import multiprocessing
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

import numpy as np

METHODS = ("auto", "pca", "umap")
PCA_ROWS = 4096  # rows the PCA covariance is estimated from, at most
UMAP_PCA_DIMS = 50  # UMAP runs on this many principal components (faster neighbour search)
UMAP_NEIGHBORS = 15
UMAP_MIN_DIST = 0.1


@dataclass(frozen=True)
class Projection:
    """``xy`` ``(n, 2)`` float32 map coordinates and the ``method`` that made them."""

    xy: np.ndarray
    method: str


def umap_available() -> bool:
    """Whether ``umap-learn`` is importable (checked without importing it)."""
    return importlib.util.find_spec("umap") is not None


def pca(x: np.ndarray, k: int = 2) -> np.ndarray:
    """``(n, C)`` -> ``(n, k)`` float32 scores on the top ``k`` principal components (fewer
    columns are zero when ``C < k``), largest variance first; each component's sign is fixed
    so that its largest loading is positive (deterministic output). The ``(C, C)``
    covariance is estimated from at most :data:`PCA_ROWS` evenly spaced rows (plenty for a
    map's two directions; a quarter of the work at 20,000 points)."""
    x = np.asarray(x, dtype=np.float32)
    n, c = x.shape
    out = np.zeros((n, k), np.float32)
    if n == 0 or c == 0:
        return out
    centered = x - x.mean(axis=0, dtype=np.float64).astype(np.float32)
    sample = centered[::max(1, -(-n // PCA_ROWS))].astype(np.float64)
    cov = sample.T @ sample / max(1, len(sample) - 1)  # (C, C)
    _, vecs = np.linalg.eigh(cov)  # ascending eigenvalues
    top = vecs[:, ::-1][:, :min(k, c)]  # (C, k')
    signs = np.sign(top[np.abs(top).argmax(axis=0), np.arange(top.shape[1])])
    top = (top * np.where(signs == 0, 1.0, signs)).astype(np.float32)
    out[:, :top.shape[1]] = centered @ top
    return out


def umap_2d(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """``(n, C)`` -> ``(n, 2)`` float32 UMAP embedding (cosine metric, on the top
    :data:`UMAP_PCA_DIMS` principal components). Needs ``umap-learn`` (ImportError)."""
    import umap  # lazily: optional, slow to import (numba)

    x = np.asarray(x, dtype=np.float32)
    if x.shape[1] > UMAP_PCA_DIMS:
        x = pca(x, UMAP_PCA_DIMS)
    reducer = umap.UMAP(n_components=2, n_neighbors=min(UMAP_NEIGHBORS, max(2, len(x) - 1)),
                        min_dist=UMAP_MIN_DIST, metric="cosine", random_state=seed)
    return np.asarray(reducer.fit_transform(x), dtype=np.float32)


def project_2d(x: np.ndarray, method: str = "auto", seed: int = 0) -> Projection:
    """``(n, C)`` pooled features -> :class:`Projection` ``(n, 2)``. ``method``: one of
    :data:`METHODS`; ``"umap"`` without ``umap-learn`` raises ImportError; UMAP needs at
    least 4 points (fewer fall back to PCA)."""
    if method not in METHODS:
        raise ValueError(f"unknown projection {method!r} (one of {', '.join(METHODS)})")
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected (n, C) features, got shape {x.shape}")
    use_umap = method == "umap" or (method == "auto" and umap_available())
    if use_umap and len(x) >= 4:
        return Projection(umap_2d(x, seed), "umap")
    return Projection(pca(x, 2), "pca")


Projector = Callable[[np.ndarray, int], np.ndarray]
"""``(x (n, C), seed) -> (n, 2)``: a projection a :class:`ProjectionProcess` runs."""

CHILD_NICE = 5  # the child yields the CPU to the app, as the GUI's worker threads do


class ProjectionProcess:
    """Runs a slow projection (``target``, default :func:`umap_2d`) in a child process, which
    can be killed at once from any thread: a thread busy in numba's compiler or UMAP's
    optimiser cannot be interrupted, and a window closing would wait for it.

    The child is spawned, never forked (a fork of a process running Qt and thread pools is
    unsafe), so ``target`` must be a module-level function; it stays up between runs (numba's
    compiled code with it: UMAP's first call in a process costs minutes, later ones seconds).
    :meth:`cancel` kills a run in flight (the next run starts a new child); :meth:`stop` kills
    the child and refuses further runs. ``requires``: the module ``target`` needs
    (:meth:`ready`). One run at a time."""

    def __init__(self, target: Projector = umap_2d, requires: str | None = "umap") -> None:
        self.target, self.requires = target, requires
        self._lock = threading.Lock()
        self._proc: BaseProcess | None = None
        self._conn: Connection | None = None
        self._runs = 0  # runs started; the one in flight, if any, is the last
        self._busy = False
        self._killed = 0  # the run cancel() killed
        self._stopped = False

    def ready(self) -> bool:
        """Whether ``target`` can run here (its ``requires`` is installed; checked without
        importing it) and :meth:`stop` has not been called."""
        return not self._stopped and (
            self.requires is None or importlib.util.find_spec(self.requires) is not None)

    @property
    def running(self) -> bool:
        """Whether a run is in flight (its child computing)."""
        return self._busy

    def run(self, x: np.ndarray, seed: int = 0) -> np.ndarray | None:
        """``(n, C)`` -> ``(n, 2)`` float32, computed in the child; blocks until it answers.
        None if :meth:`cancel` or :meth:`stop` came first or during the run. RuntimeError
        with the child's error, or if the child died on its own."""
        with self._lock:
            if self._stopped:
                return None
            conn = self._child_conn()
            self._runs += 1
            me, self._busy = self._runs, True
        try:
            conn.send((self.target, np.asarray(x, dtype=np.float32), seed))
            ok, value = conn.recv()
        except (EOFError, OSError):  # killed by cancel() / stop(), or it died
            with self._lock:
                if self._conn is conn:
                    self._drop_child()
                if self._stopped or self._killed == me:
                    return None
            raise RuntimeError("the projection process ended without a result") from None
        finally:
            self._busy = False
        if not ok:
            raise RuntimeError(value)
        return None if self._stopped or self._killed == me else value

    def cancel(self) -> None:
        """Kill the run in flight, if any (returns at once); later runs start a new child."""
        with self._lock:
            if self._busy:
                self._killed = self._runs
                self._kill()

    def stop(self) -> None:
        """End the child and refuse further runs. Returns at once: a busy child is killed,
        an idle one told to exit (our end of the pipe closes: it cleans up and ends)."""
        with self._lock:
            self._stopped = True
            self._killed = self._runs
            if self._busy:
                self._kill()
            elif self._conn is not None:
                self._conn.close()
                self._conn = None

    def _child_conn(self) -> Connection:
        """The idle child's end of the pipe, starting a child if there is none (lock held)."""
        if self._proc is not None and self._conn is not None and self._proc.is_alive():
            return self._conn
        self._drop_child()
        ctx = multiprocessing.get_context("spawn")
        ours, theirs = ctx.Pipe(duplex=True)
        proc = ctx.Process(target=_serve, args=(theirs,), daemon=True,
                           name="fewshot-studio projection")
        proc.start()
        theirs.close()  # the child holds its end: if it dies, ours reads EOF
        self._proc, self._conn = proc, ours
        return ours

    def _kill(self) -> None:
        """(lock held) Kill the child; the thread in :meth:`run` then reads EOF."""
        if self._proc is not None:
            with contextlib.suppress(OSError, ValueError):  # gone already
                self._proc.kill()

    def _drop_child(self) -> None:
        """(lock held) Forget a dead child: reap it, close our end."""
        proc, conn, self._proc, self._conn = self._proc, self._conn, None, None
        if conn is not None:
            conn.close()
        if proc is not None:
            with contextlib.suppress(OSError, ValueError):
                proc.kill()
            proc.join(1)


def _serve(conn: Connection) -> None:
    """The child process: answer each ``(target, x, seed)`` with ``(True, xy (n, 2))`` or
    ``(False, "Error: message")`` until the parent's end closes."""
    with contextlib.suppress(OSError, AttributeError):
        os.nice(CHILD_NICE)
    while True:
        try:
            target, x, seed = conn.recv()
        except (EOFError, OSError):
            return
        result: tuple[bool, Any]
        try:
            result = (True, np.asarray(target(x, seed), dtype=np.float32))
        except Exception as e:  # reported to the parent, which raises it there
            result = (False, f"{type(e).__name__}: {e}")
        conn.send(result)
