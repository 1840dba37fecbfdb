"""The labeling session: classes (name -> support images), a folder of query images and a
checkpoint in; a :class:`~fewshot_studio.engine.api.Prediction` per query image out.

How it works
------------
* Every image (support or query) goes through ``model.embed`` once; the feature is cached in
  SQLite (:class:`~fewshot_studio.engine.cache.EmbeddingCache`) keyed by absolute path, size,
  mtime and checkpoint identity. A later run over the same files embeds nothing.
* Query images stream in batches: a thread pool decodes (JPEG draft mode) the next batches
  while the backend (ONNX Runtime or torch, see :mod:`.backends`) embeds the current one.
  Only the features are kept (one ``(n_query, d)`` array), never the pixels.
* The support-dependent head (``model.fit`` on support features -> predictor -> logits on
  query features) always runs in torch on the CPU; it is cheap, so a correction, a new
  example or a new threshold recomputes every prediction from the cached features.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np

from fewshot_studio.engine.api import EngineCounters, LabelSettings, Prediction
from fewshot_studio.engine.backends import EmbedBackend, embed_is_identity
from fewshot_studio.engine.cache import FEATURE_FORMAT, EmbeddingCache
from fewshot_studio.engine.embedding import EmbeddingPipeline
from fewshot_studio.engine.head import PredictionHead
from fewshot_studio.engine.query_store import _QueryStore
from fewshot_studio.errors import UserError
from fewshot_studio.progress import Progress

log = logging.getLogger(__name__)

DEFAULT_SETTINGS = LabelSettings()


def _abs(p: str | os.PathLike[str]) -> Path:
    return Path(os.path.abspath(os.fspath(p)))


class LabelingSession(EmbeddingPipeline, PredictionHead):
    """Qt-free labeling session; NOT thread-safe: call it from one worker at a time.

    ``checkpoint``: a bundled name or a path. ``settings``: see
    :class:`~fewshot_studio.engine.api.LabelSettings`. ``cache_path``: the SQLite embedding
    cache (default ``paths.user_cache_dir()/embeddings.sqlite``); exported ONNX models are
    cached in ``paths.user_cache_dir()/onnx`` wherever the cache is. ``backend``: "auto" |
    "onnxruntime" | "torch".

    The backend (ONNX export on first use of a checkpoint, session creation) is built lazily
    on the first call that embeds (:meth:`run`, :meth:`relabel`) or by :meth:`prepare`;
    :attr:`backend` says what will run before that and what really runs after it.
    """

    def __init__(self, checkpoint: str | Path, settings: LabelSettings = DEFAULT_SETTINGS,
                 cache_path: Path | None = None, backend: str = "auto") -> None:
        from fewshot_studio.io.checkpoint import CheckpointError, load_checkpoint
        from fewshot_studio.paths import resolve_checkpoint

        path = resolve_checkpoint(str(checkpoint))
        ckpt = load_checkpoint(path)
        try:
            model = ckpt.build("cpu")
        except Exception as e:
            raise CheckpointError(f"{path}: cannot build the model it describes "
                                  f"({type(e).__name__}: {e})") from None
        self.checkpoint_path = path
        self.checkpoint_name = ckpt.name or path.stem
        self.checkpoint_metadata = ckpt.metadata()
        self.preprocess = ckpt.preprocess
        # temperature scaling (Guo et al. 2017) fitted by `fewshot-studio calibrate`; 1 if none
        self.temperature = ckpt.temperature
        self.model = model.float().eval()
        self._identity_embed = embed_is_identity(self.model, ckpt.preprocess)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.settings = settings
        self.counters = EngineCounters()
        self.class_names: list[str] = []
        self._prefer = backend
        self._cache = EmbeddingCache(cache_path)
        self.model_id = f"{self._cache.checkpoint_identity(path)}:{FEATURE_FORMAT}"
        self._note_cache()
        self._backend: EmbedBackend | None = None
        self.backend = self._expected_backend()
        self._pool: ThreadPoolExecutor | None = None
        self._support: dict[str, list[Path]] = {}
        self._support_feats: dict[Path, np.ndarray | str] = {}
        self._corrections: dict[Path, str] = {}
        self._corrected_feats: dict[Path, np.ndarray] = {}
        self._store = _QueryStore([])
        self._preds: list[Prediction | None] = []
        self._support_dirty = False

    # -- classes ---------------------------------------------------------------------------
    def set_support(self, classes: Mapping[str, Sequence[Path]]) -> None:
        """Replace all classes (ordered: class index = position). Cheap: nothing is embedded
        until :meth:`run`, :meth:`relabel` or :meth:`correct`."""
        support: dict[str, list[Path]] = {}
        for name, paths in classes.items():
            name = str(name)
            if not name.strip():
                raise UserError("a class has an empty name")
            support[name] = [_abs(p) for p in paths]
        self._support = support
        self.class_names = list(support)
        self._support_dirty = True  # predictions are stale until relabel()/run()

    def support(self) -> dict[str, list[Path]]:
        """The current support per class, including corrected query images that joined it."""
        out = {k: list(v) for k, v in self._support.items()}
        if self.settings.corrections_join_support:
            for path, label in sorted(self._corrections.items()):
                if label in out and path not in out[label]:
                    out[label].append(path)
        return out

    def _validate_classes(self) -> None:
        if len(self._support) < 2:
            raise UserError(f"need at least 2 classes, got {len(self._support)}")
        for name, paths in self._support.items():
            if not paths:
                raise UserError(f"class {name!r} has no example images")

    def _ensure_support(self) -> None:
        """Embed (through the cache) support images not seen yet; check every class has a
        readable image (UserError naming the class otherwise)."""
        self._validate_classes()
        missing = sorted({p for ps in self._support.values() for p in ps}
                         - set(self._support_feats))
        for start, results in self._embed_stream(missing):
            for p, r in zip(missing[start:start + len(results)], results, strict=True):
                self._support_feats[p] = r
        for name, paths in self._support.items():
            if not any(isinstance(self._support_feats.get(p), np.ndarray) for p in paths):
                reasons = "; ".join(f"{p.name}: {self._support_feats.get(p)}" for p in paths[:3])
                raise UserError(f"class {name!r} has no readable example image ({reasons})")

    # -- public API ------------------------------------------------------------------------
    def run(self, query_paths: Sequence[Path]) -> Iterator[Progress]:
        """Label ``query_paths`` (any order; labeled in sorted order). Validates the classes
        first (>= 2 classes, each with >= 1 readable image, else UserError naming the class),
        then streams: each yielded Progress carries ``payload`` = the predictions of the
        batch just finished. With transductive refinement (or corrections that join the
        support) a last Progress carries every prediction, recomputed. ``gen.close()``
        cancels cleanly; what finished stays in :meth:`predictions`."""
        paths = sorted({_abs(p) for p in query_paths})
        total = len(paths)
        yield Progress(0, total, "embedding examples")
        self._support_feats = {}  # re-read through the cache: example files may have changed
        self._ensure_support()
        self._store = _QueryStore(paths)
        self._preds = [None] * total
        predictor = self._predictor()
        self._support_dirty = False
        base_corrected = {p for p in self._corrections if p in self._corrected_feats}
        done = 0
        stream = self._embed_stream(paths)
        try:
            for start, results in stream:
                st = self._store
                for j, r in enumerate(results):
                    st.put(start + j, r)
                    if isinstance(r, str):
                        self.counters.errors += 1
                self._predict_range(predictor, start, start + len(results))
                done += len(results)
                batch = [p for p in self._preds[start:start + len(results)] if p is not None]
                yield Progress(done, total, "labeling", payload=batch)
        finally:
            stream.close()
        newly_corrected = {p for p in self._corrections
                           if p in self._store.index and p not in base_corrected}
        if self.settings.transductive or (self.settings.corrections_join_support
                                          and newly_corrected):
            preds = self._relabel_all()
            yield Progress(total, total, "refined", payload=preds)

    def relabel(self) -> list[Prediction]:
        """Recompute every prediction from cached features (after :meth:`set_support`; new
        example images are embedded first, through the cache). Returns all predictions."""
        self._ensure_support()
        return self._relabel_all()

    def set_settings(self, settings: LabelSettings) -> list[Prediction]:
        """New settings; relabels from cached features (a new device, precision, batch size
        or test-time augmentation only takes effect for the next embedding)."""
        old = self.settings
        self.settings = settings
        if settings.device != old.device or settings.precision != old.precision:
            if self._backend is not None:
                self._backend.close()
            self._backend = None
            self.backend = self._expected_backend()
        if not self._store.done.any():
            return self.predictions()
        if not self._support_dirty and replace(
                settings, unknown_threshold=old.unknown_threshold, miss_rate=old.miss_rate,
                device=old.device, precision=old.precision, batch_size=old.batch_size,
                recursive=old.recursive, tta=old.tta) == old:
            # only the threshold or miss rate (or embedding-side settings) changed: no head
            self._predict_range(None, 0, self._store.n)
            self.counters.relabels += 1
            return self.predictions()
        if self._support and len(self._support) >= 2:
            self._ensure_support()
            return self._relabel_all()
        return self.predictions()

    def correct(self, paths: Sequence[Path], label: str | None) -> list[Prediction]:
        """Set (or with ``label=None`` remove) the user's label of query images; corrected
        images join their class's support when ``settings.corrections_join_support``. Every
        prediction is recomputed from cached features (nothing is re-embedded)."""
        if label is not None and label not in self.class_names:
            raise UserError(f"unknown class {label!r} (classes: {', '.join(self.class_names)})")
        for p in paths:
            p = _abs(p)
            if label is None:
                self._corrections.pop(p, None)
                self._corrected_feats.pop(p, None)
            else:
                self._corrections[p] = label
        if not self._store.done.any() or len(self._support) < 2:
            return self.predictions()
        self._ensure_support()
        return self._relabel_all()

    def corrections(self) -> dict[Path, str]:
        return dict(self._corrections)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self._backend is not None:
            self._backend.close()
            self._backend = None
        self._cache.close()

    def __enter__(self) -> LabelingSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
