"""The driver of ``label --ray``: connect to Ray, lay out the workers, stream the query files
through Ray Data, and turn each batch of features into predictions with the session's head.

:func:`label_stream` yields :class:`~fewshot_studio.progress.Progress` like
:meth:`LabelingSession.run <fewshot_studio.engine.session.LabelingSession.run>`: each one's
``payload`` holds the predictions of the batch just finished, in path order; nothing else
is kept, so the driver's memory is bounded by a few batches: the paths go from the folder
scan's stream to Ray's object store a block at a time (:class:`PathBlocks`) and wait there as
Arrow strings, the rows go to the output as they come.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fewshot_studio.cluster import hooks
from fewshot_studio.cluster.worker import ERROR, FEATURE, N_CACHED, N_EMBEDDED, PATH, EmbedWorker
from fewshot_studio.engine.api import LabelSettings
from fewshot_studio.engine.session import LabelingSession
from fewshot_studio.errors import UserError
from fewshot_studio.progress import Progress

RAY_NEEDS = 'label --ray needs Ray: pip install "fewshot-studio[cluster]"'
BLOCK_ROWS = 1024
"""Paths per Ray Data block (and per worker call): about a second of one CPU worker's work;
a worker that dies loses at most this much."""
MAX_CPUS_PER_WORKER = 8  # a worker decodes with up to 8 threads (engine.backends.decode_workers)


def import_ray() -> Any:
    """The ``ray`` module with Ray Data; UserError naming the extra when it is missing."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise UserError(RAY_NEEDS) from None
    return ray


def connect(address: str) -> bool:
    """Join Ray: ``"local"`` starts a local Ray (all of this machine's CPUs); ``"auto"`` the
    running cluster this machine belongs to; anything else is a cluster address
    (``ray://HOST:10001`` or ``HOST:6379``). An already initialised Ray (a test's, a
    notebook's) is used as it is. Returns whether this call started it (then
    :func:`disconnect` stops it)."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING,
                              "configure_logging": True}
    try:
        if address == "local":
            ray.init(**kwargs)
        else:
            ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise UserError(f"--ray {address}: cannot connect to Ray ({e})") from None
    return True


def disconnect(started: bool) -> None:
    if started:
        import_ray().shutdown()


@dataclass(frozen=True)
class Layout:
    """How many actor workers, and what each reserves."""

    workers: int
    cpus: float
    gpus: float

    def __str__(self) -> str:
        per = f"{self.cpus:g} CPU" + (f" + {self.gpus:g} GPU" if self.gpus else "")
        return f"{self.workers} worker{'s' if self.workers != 1 else ''} x ({per})"


def plan_layout(resources: dict[str, float], device: str, workers: int | None = None,
                cpus_per_worker: int | None = None) -> Layout:
    """Workers for a cluster with ``resources`` (``ray.cluster_resources()``): one per GPU
    when it has GPUs and ``device`` is not "cpu" (``num_gpus=1`` each, the CPUs shared out);
    else CPU workers of ``cpus_per_worker`` CPUs (default ``min(8, CPUs)``: a worker decodes
    with up to 8 threads), as many as fit. ``workers``: that many instead (more than fit
    now waits for an autoscaling cluster to add nodes)."""
    cpus = max(1.0, float(resources.get("CPU", 1)))
    gpus = int(resources.get("GPU", 0))
    if device == "cuda" and not gpus:
        raise UserError("--device cuda: the Ray cluster has no GPU")
    if workers is not None and workers < 1:
        raise UserError("--ray-workers must be >= 1")
    if gpus and device != "cpu":
        return Layout(workers or gpus, max(1.0, min(MAX_CPUS_PER_WORKER, cpus // gpus)), 1.0)
    per = float(cpus_per_worker or min(MAX_CPUS_PER_WORKER, cpus))
    return Layout(workers or max(1, int(cpus // per)), per, 0.0)


MAX_BLOCKS = 2048
"""Blocks per run at most: Ray Data keeps ~40 KB on the driver per block it has run
(measured, docs/scale.md), so a run of millions gets bigger blocks rather than more."""


def block_rows(expected: int, layout: Layout) -> int:
    """Paths per Ray Data block for about ``expected`` queries: :data:`BLOCK_ROWS`, fewer
    for a small run so that every worker gets some (4 blocks per worker at least), more
    beyond :data:`MAX_BLOCKS` blocks (ten million images: blocks of 4,883)."""
    small = math.ceil(expected / (4 * layout.workers))
    return max(1, min(BLOCK_ROWS, small), math.ceil(expected / MAX_BLOCKS))


class PathBlocks:
    """The query paths in Ray's object store as the Ray Data blocks of a run: Arrow tables
    of ``rows`` paths each, put as the paths come (:meth:`put`), so the driver holds one
    block's paths at a time and a reference per block (``refs``; ``total`` paths)."""

    def __init__(self, rows: int) -> None:
        self.rows = rows
        self.refs: list[Any] = []
        self.total = 0

    def put(self, paths: Iterable[Path]) -> Iterator[int]:
        """Put ``paths`` (absolute, strictly increasing: the engine's order, as a scan's
        stream has them; ValueError otherwise), a block at a time; yields the count so far
        after each block."""
        import pyarrow as pa

        ray = import_ray()
        it = iter(paths)
        last: list[Path] = []
        while chunk := list(itertools.islice(it, self.rows)):
            if not (chunk[0].is_absolute()
                    and all(a < b for a, b in itertools.pairwise(last + chunk))):
                raise ValueError("query paths must be absolute and strictly increasing")
            last = chunk[-1:]
            self.refs.append(ray.put(pa.table({PATH: pa.array([str(p) for p in chunk],
                                                              pa.string())})))
            self.total += len(chunk)
            yield self.total


def _results(batch: dict[str, np.ndarray], shape: tuple[int, ...]) -> list[hooks.Result]:
    """A worker batch back to the engine's per-image results (feature or reason)."""
    feats = batch[FEATURE]
    return [str(e) if e else feats[i].reshape(shape) for i, e in enumerate(batch[ERROR])]


def layout_for(device: str, workers: int | None = None,
               cpus_per_worker: int | None = None) -> Layout:
    """:func:`plan_layout` for the connected cluster."""
    return plan_layout(import_ray().cluster_resources(), device, workers, cpus_per_worker)


def label_stream(session: LabelingSession, blocks: PathBlocks, layout: Layout, *,
                 backend: str = "auto", cache: Path | None = None,
                 worker_settings: LabelSettings | None = None) -> Iterator[Progress]:
    """Label the paths of ``blocks`` (all put) on the connected Ray cluster (see
    :func:`connect`) with the session's checkpoint, support set and settings, on
    ``layout``'s workers. Like ``session.run``: a first Progress while the support set is
    embedded (on the driver, through the driver's cache), then one per batch with its
    predictions as ``payload``, in sorted path order. ``cache``: an embedding cache file
    each worker opens on its own node (None: workers use none). Transductive refinement
    needs every query at once and is refused (UserError). ``worker_settings``: the
    workers' (default the session's; ``label --ray --device cuda`` asks CUDA of the workers
    only). Each Progress's ``metrics`` count ``embedded`` and ``cache_hits`` on the workers
    so far."""
    if session.settings.transductive:
        raise UserError("--transductive cannot be used with --ray (it refines with every "
                        "query at once)")
    ray = import_ray()
    total = blocks.total
    yield Progress(0, total, "embedding examples")
    shape = hooks.fit_head(session)
    if not total:  # the folder emptied since it was counted
        return
    yield Progress(0, total, f"starting {layout}")
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # batches come back in path order
    ctx.enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # its progress lines: ours instead
    ds = ray.data.from_arrow_refs(blocks.refs).map_batches(
        EmbedWorker, batch_size=None, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=layout.workers),
        num_cpus=layout.cpus, num_gpus=layout.gpus or None,
        # Ray Data's defaults restart a killed worker and redo its batch (max_restarts and
        # max_task_retries -1); the checkpoint stays in the object store while the driver
        # holds this reference (nested in a list: the constructor arguments stay small).
        fn_constructor_kwargs={
            "checkpoint": [ray.put(session.checkpoint_path.read_bytes())],
            "settings": worker_settings or session.settings,
            "backend": backend, "cache": str(cache) if cache else None,
            "feature_size": int(np.prod(shape))})
    done = embedded = cached = 0
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
        batch_paths = [Path(str(p)) for p in batch[PATH]]
        preds = session.predict_features(batch_paths, _results(batch, shape))
        done += len(preds)
        embedded += int(batch[N_EMBEDDED].sum())
        cached += int(batch[N_CACHED].sum())
        yield Progress(done, total, "labeling", {"embedded": embedded, "cache_hits": cached},
                       payload=preds)
    if done != total:
        raise RuntimeError(f"Ray returned {done} of {total} images")
