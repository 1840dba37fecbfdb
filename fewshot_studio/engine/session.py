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

The session is composed of three parts, each owning its state: the
:class:`~fewshot_studio.engine.embedding.EmbeddingPipeline` (paths -> cached features), the
:class:`~fewshot_studio.engine.support.SupportSet` (classes, example features, corrections)
and the :class:`~fewshot_studio.engine.head.PredictionHead` (features -> predictions). It
keeps the current query set (:class:`~fewshot_studio.engine.query_store._QueryStore`) and
its predictions.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
from torch import Tensor

from fewshot_studio.engine.api import BackendInfo, EngineCounters, LabelSettings, Prediction
from fewshot_studio.engine.backends import torch_cuda_works
from fewshot_studio.engine.cache import FEATURE_FORMAT, EmbeddingCache
from fewshot_studio.engine.embedding import EmbeddingPipeline
from fewshot_studio.engine.finetuned import FinetunedModel
from fewshot_studio.engine.head import SUSPICIOUS_MIN_PROB, PredictionHead
from fewshot_studio.engine.query_store import _QueryStore
from fewshot_studio.engine.support import SupportSet, abs_path
from fewshot_studio.models.base import Predictor
from fewshot_studio.progress import Progress

log = logging.getLogger(__name__)

DEFAULT_SETTINGS = LabelSettings()


class LabelingSession:
    """Qt-free labeling session; NOT thread-safe: call it from one worker at a time.

    ``checkpoint``: a bundled name or a path. ``settings``: see
    :class:`~fewshot_studio.engine.api.LabelSettings`. ``cache_path``: the SQLite embedding
    cache (default ``paths.user_cache_dir()/embeddings.sqlite``); exported ONNX models are
    cached in ``paths.user_cache_dir()/onnx`` wherever the cache is. ``backend``: "auto" |
    "onnxruntime" | "torch".

    The backend (ONNX export on first use of a checkpoint, session creation) is built lazily
    on the first call that embeds (:meth:`run`, :meth:`relabel`) or by :meth:`prepare`;
    :attr:`backend` says what will run before that and what really runs after it.
    ``embedding`` and ``head`` are the two halves (see the module docstring).
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
        self.model = model.float().eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.settings = settings
        self.counters = EngineCounters()
        cache = EmbeddingCache(cache_path)
        self.model_id = f"{cache.checkpoint_identity(path)}:{FEATURE_FORMAT}"
        self.embedding = EmbeddingPipeline(self.model, ckpt.preprocess, self.checkpoint_metadata,
                                           self.model_id, cache, self.counters, settings,
                                           backend)
        # temperature scaling (Guo et al. 2017) fitted by `fewshot-studio calibrate`; 1 if none
        self.head = PredictionHead(self.model, ckpt.temperature, self.counters)
        # adapt="finetune": the session's fine-tuned copy (built by run(), never saved)
        self._backend_choice = backend
        self.finetuned = FinetunedModel(self.model, ckpt.preprocess, self.model_id)
        self._support = SupportSet()
        self._store = _QueryStore([])
        self._preds: list[Prediction | None] = []
        self._support_dirty = False

    # -- what runs -------------------------------------------------------------------------
    @property
    def backend(self) -> BackendInfo:
        """What embeds: before :meth:`prepare`, what will (detail "not started")."""
        return self.embedding.backend

    @property
    def temperature(self) -> float:
        """The checkpoint's calibration temperature (1.0 if none)."""
        return self.head.temperature

    @property
    def head_kind(self) -> str:
        """What labels the queries: "prototypes" or "head" (the many-shot head); "" before
        the first fit."""
        return self.head.kind

    @property
    def class_names(self) -> list[str]:
        """Class names; class index = position."""
        return self._support.names

    def prepare(self) -> BackendInfo:
        """Build the backend now (export to ONNX, and quantise for int8, on first use);
        returns what runs."""
        return self.embedding.prepare()

    def onnx_path(self) -> Path:
        """The exported ``model.embed`` (see :meth:`EmbeddingPipeline.onnx_path`)."""
        return self.embedding.onnx_path()

    def int8_onnx_path(self) -> Path:
        """Its int8 version (see :meth:`EmbeddingPipeline.int8_onnx_path`)."""
        return self.embedding.int8_onnx_path()

    # -- classes ---------------------------------------------------------------------------
    def set_support(self, classes: Mapping[str, Sequence[Path]]) -> None:
        """Replace all classes (ordered: class index = position). Cheap: nothing is embedded
        until :meth:`run`, :meth:`relabel` or :meth:`correct`."""
        self._support.set_classes(classes)
        self._support_dirty = True  # predictions are stale until relabel()/run()

    def support(self) -> dict[str, list[Path]]:
        """The current support per class, including corrected query images that joined it."""
        return self._support.with_corrections(self.settings.corrections_join_support)

    def _ensure_support(self) -> None:
        """Embed (through the cache) support images not seen yet; check every class has a
        readable image (UserError naming the class otherwise)."""
        sup = self._support
        sup.validate()
        missing = sup.missing()
        for start, results in self.embedding.stream(missing):
            for p, r in zip(missing[start:start + len(results)], results, strict=True):
                sup.feats[p] = r
        sup.check_readable()

    # -- the head --------------------------------------------------------------------------
    def _predictor(self, transductive: bool = False) -> Predictor:
        """Fit the support set; refined over the valid queries when ``transductive``."""
        x, y, _ = self._support.rows(self.settings.corrections_join_support, self._store)
        store = self._store

        def queries() -> Tensor | None:
            idx = np.flatnonzero(store.valid)
            return store.rows(idx) if len(idx) else None

        return self.head.fit(x, y, len(self.class_names), self.settings,
                             queries if transductive else None)

    def _predict_range(self, predictor: Predictor | None, start: int, stop: int) -> None:
        self.head.predict_range(self._store, self._preds, predictor, start, stop,
                                self.class_names, self._support.corrections, self.settings)

    def _relabel_all(self) -> list[Prediction]:
        """Recompute every processed query's prediction from cached features."""
        if self._store.done.any():
            self._predict_range(self._predictor(self.settings.transductive), 0, self._store.n)
        self._support_dirty = False
        self.counters.relabels += 1
        return self.predictions()

    def suspicious_examples(self, min_prob: float = SUSPICIOUS_MIN_PROB) -> dict[Path, str]:
        """Class examples that look like another class: example path -> that class's name
        (:meth:`PredictionHead.suspicious`: leave-one-out over the support; corrected images
        that join the support count, but are never flagged themselves). Uses the cached
        support features only (call it after :meth:`run` / :meth:`relabel`; examples not
        embedded yet are left out); remembered until the support changes."""
        n_examples = self._support.n_readable()
        if len(self.class_names) < 2 or not n_examples:
            return {}
        x, y, paths = self._support.rows(self.settings.corrections_join_support, self._store)
        return self.head.suspicious(x, y, paths, n_examples, self.class_names, min_prob)

    def predictions(self) -> list[Prediction]:
        """Every processed query's prediction, sorted by path."""
        return [p for p in self._preds if p is not None]

    # -- public API ------------------------------------------------------------------------
    def run(self, query_paths: Sequence[Path]) -> Iterator[Progress]:
        """Label ``query_paths`` (any order; labeled in sorted order). Validates the classes
        first (>= 2 classes, each with >= 1 readable image, else UserError naming the class),
        then streams: each yielded Progress carries ``payload`` = the predictions of the
        batch just finished. With transductive refinement (or corrections that join the
        support) a last Progress carries every prediction, recomputed. ``gen.close()``
        cancels cleanly; what finished stays in :meth:`predictions`."""
        paths = sorted({abs_path(p) for p in query_paths})
        total = len(paths)
        yield Progress(0, total, "embedding examples")
        self._support.feats = {}  # re-read through the cache: example files may have changed
        yield from self._choose_model()
        self._ensure_support()
        self._store = _QueryStore(paths)
        self._preds = [None] * total
        predictor = self._predictor()
        self._support_dirty = False
        corrections = self._support.corrections
        base_corrected = {p for p in corrections if p in self._support.corrected_feats}
        done = 0
        stream = self.embedding.stream(paths)
        try:
            for start, results in stream:
                for j, r in enumerate(results):
                    self._store.put(start + j, r)
                    if isinstance(r, str):
                        self.counters.errors += 1
                self._predict_range(predictor, start, start + len(results))
                done += len(results)
                batch = [p for p in self._preds[start:start + len(results)] if p is not None]
                yield Progress(done, total, "labeling", payload=batch)
        finally:
            stream.close()
        newly_corrected = {p for p in corrections
                           if p in self._store.index and p not in base_corrected}
        if self.settings.transductive or (self.settings.corrections_join_support
                                          and newly_corrected):
            preds = self._relabel_all()
            yield Progress(total, total, "refined", payload=preds)

    def _choose_model(self) -> Iterator[Progress]:
        """The model this run embeds with: the fine-tuned copy with ``adapt="finetune"``
        (fine-tuned first when the support set changed), else the checkpoint's. A new model
        forgets the features of corrected images taken from the old one."""
        model, model_id, prefer = self.model, self.model_id, self._backend_choice
        if self.settings.adapt == "finetune":
            self._support.validate()
            yield from self.finetuned.update(
                self._support.with_corrections(self.settings.corrections_join_support),
                self.embedding.decode,
                "cuda" if self.settings.device != "cpu" and torch_cuda_works() else "cpu")
            assert self.finetuned.model is not None
            model, model_id, prefer = self.finetuned.model, self.finetuned.model_id, "torch"
        if model is not self.head.model:
            self._support.corrected_feats = {}
        self.embedding.use_model(model, model_id, prefer)
        self.head.model = model

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
        self.embedding.configure(settings)
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
        if len(self.class_names) >= 2:
            self._ensure_support()
            return self._relabel_all()
        return self.predictions()

    def correct(self, paths: Sequence[Path], label: str | None) -> list[Prediction]:
        """Set (or with ``label=None`` remove) the user's label of query images; corrected
        images join their class's support when ``settings.corrections_join_support``. Every
        prediction is recomputed from cached features (nothing is re-embedded)."""
        self._support.correct(paths, label)
        if not self._store.done.any() or len(self.class_names) < 2:
            return self.predictions()
        self._ensure_support()
        return self._relabel_all()

    def corrections(self) -> dict[Path, str]:
        return dict(self._support.corrections)

    def predict_features(self, paths: Sequence[Path],
                         results: Sequence[np.ndarray | str]) -> list[Prediction]:
        """Label query images embedded elsewhere (``label --ray``'s workers): ``paths``
        (absolute, sorted) from their ``(*feature_shape)`` float32 features or why they have
        none, by the head the last :meth:`run` fitted (``run([])`` fits it on the support
        alone), as :meth:`run` labels a batch (errors counted). The session's own queries
        and predictions stay as they are. RuntimeError before any run."""
        if self.head.adapted is None:
            raise RuntimeError("predict_features needs a fitted head: run() first")
        store = _QueryStore(list(paths))
        for i, r in enumerate(results):
            store.put(i, r)
            if isinstance(r, str):
                self.counters.errors += 1
        preds: list[Prediction | None] = [None] * len(paths)
        self.head.predict_range(store, preds, self.head.adapted.predictor, 0, len(paths),
                                self.class_names, self._support.corrections, self.settings)
        return [p for p in preds if p is not None]

    def disable_cache(self) -> None:
        """No embedding cache from now on: lookups miss and nothing is written (a
        ``label --ray`` worker without ``--cache``)."""
        self.embedding.cache.close()
        self.embedding.note_cache()

    def close(self) -> None:
        self.embedding.close()

    def __enter__(self) -> LabelingSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
