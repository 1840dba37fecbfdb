"""The Ray Data actor that embeds query files: one per worker slot, holding a labeling
session's embedding pipeline (the checkpoint, the backend: ONNX Runtime on a CPU worker,
torch or onnxruntime-gpu on a GPU worker, as :func:`~fewshot_studio.engine.backends.
select_backend` picks on that node). Imported by the Ray workers, never by the CLI's
``--help``."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from fewshot_studio.engine.api import LabelSettings

FEATURE = "feature"
ERROR = "error"
PATH = "path"
N_EMBEDDED = "n_embedded"  # row 0 of a batch: images embedded (the others 0)
N_CACHED = "n_cached"  # row 0 of a batch: features read from the worker's cache


def checkpoint_file(blob: bytes, suffix: str = ".safetensors") -> Path:
    """The checkpoint's bytes as a file on this node (``<tmp>/fewshot-studio-ray/<sha256>``;
    written once, atomically): workers need no shared file system for it, and its identity
    (the SHA-256 of the bytes) is the driver's."""
    digest = hashlib.sha256(blob).hexdigest()
    folder = Path(tempfile.gettempdir()) / "fewshot-studio-ray"
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"{digest}{suffix}"
    if not out.is_file():
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".ckpt-", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        os.replace(tmp, out)
    return out


class EmbedWorker:
    """``map_batches`` callable: ``{"path": (n,) str}`` -> the same with ``feature``
    ``(n, d)`` float32 (zeros for errors), ``error`` ``(n,)`` str ("" for a feature) and the
    batch's :data:`N_EMBEDDED` / :data:`N_CACHED` counts in row 0.

    ``checkpoint``: ``[ObjectRef]`` of its bytes; ``settings``: the run's (device,
    precision, batch size and TTA matter here); ``backend``: "auto" | "onnxruntime" |
    "torch"; ``cache``: an embedding cache file on the worker's node, or None for none
    (every image embedded, nothing written); ``feature_size``: ``d``, the flattened feature
    size (from the support set)."""

    def __init__(self, checkpoint: list[Any], settings: LabelSettings, backend: str,
                 cache: str | None, feature_size: int) -> None:
        import ray

        from fewshot_studio.engine.session import LabelingSession

        blob = ray.get(checkpoint[0])
        self.session = LabelingSession(checkpoint_file(blob), settings,
                                       cache_path=Path(cache) if cache else None,
                                       backend=backend)
        if not cache:
            self.session.disable_cache()
        self.session.prepare()
        self.d = feature_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from fewshot_studio.cluster import hooks

        paths = [Path(str(p)) for p in batch[PATH]]
        n = len(paths)
        counters = self.session.counters
        embedded, cached = counters.embedded, counters.cache_hits
        results = hooks.embed_paths(self.session, paths)
        feats = np.zeros((n, self.d), np.float32)
        errors = np.full(n, "", dtype=object)
        for i, r in enumerate(results):
            if isinstance(r, str):
                errors[i] = r
            else:
                feats[i] = r.reshape(-1)
        counts = np.zeros((2, n), np.int64)
        if n:
            counts[:, 0] = counters.embedded - embedded, counters.cache_hits - cached
        return {PATH: np.asarray(batch[PATH]), FEATURE: feats, ERROR: errors,
                N_EMBEDDED: counts[0], N_CACHED: counts[1]}

    def __del__(self) -> None:
        session = getattr(self, "session", None)
        if session is not None:
            session.close()
