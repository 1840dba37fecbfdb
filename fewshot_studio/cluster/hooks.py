"""Where the Ray path meets the engine, in one place: the session's two halves
(``session.embedding``, an :class:`~fewshot_studio.engine.embedding.EmbeddingPipeline`, and
``session.head``, a :class:`~fewshot_studio.engine.head.PredictionHead`) used as a local run
uses them. Workers embed with the pipeline (cache, decode, backend and error reasons exactly as
a local run); the driver fits the head once (``session.run`` over no query) and runs
``head.predict_range`` on one batch at a time. Every labeling decision (probabilities,
temperature, adaptation, unknown rule) stays in :mod:`fewshot_studio.engine.head`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fewshot_studio.engine.api import Prediction
from fewshot_studio.engine.query_store import _QueryStore
from fewshot_studio.engine.session import LabelingSession
from fewshot_studio.models.base import Predictor

Result = np.ndarray | str  # an image's feature, or why it has none


def embed_paths(session: LabelingSession, paths: Sequence[Path]) -> list[Result]:
    """Features (``(*feature_shape)`` float32) or error reasons of ``paths``, in order,
    through the session's pipeline."""
    out: list[Result] = []
    for _, results in session.embedding.stream(list(paths)):
        out.extend(results)
    return out


def cache_off(session: LabelingSession) -> None:
    """No embedding cache for this session from now on (lookups miss, nothing is written)."""
    session.embedding.cache.close()
    session.embedding.note_cache()


def fit_head(session: LabelingSession) -> tuple[Predictor, tuple[int, ...]]:
    """Embed the support set (through the cache) and fit the head exactly as
    :meth:`LabelingSession.run` does before its first batch (it is that code: a run over no
    query). UserError for a class without a readable example. Returns the fitted predictor
    and the feature shape (the backend embeds one blank image)."""
    for _ in session.run([]):
        pass
    adapted = session.head.adapted
    assert adapted is not None
    session.prepare()
    pre = session.preprocess
    blank = np.zeros((1, pre.channels, pre.image_size, pre.image_size), np.float32)
    shape = tuple(session.embedding.embed_arrays(blank).shape[1:])
    return adapted.predictor, shape


def predict_batch(session: LabelingSession, predictor: Predictor, paths: Sequence[Path],
                  results: Sequence[Result]) -> list[Prediction]:
    """The predictions of one batch of query ``paths`` (absolute, sorted) from their
    ``results`` (features or error reasons): ``session.head.predict_range`` (probabilities,
    unknown rule, top-3) on a store of this batch only, so the driver holds one batch."""
    store = _QueryStore(list(paths))
    for i, r in enumerate(results):
        store.put(i, r)
        if isinstance(r, str):
            session.counters.errors += 1
    preds: list[Prediction | None] = [None] * len(paths)
    session.head.predict_range(store, preds, predictor, 0, len(paths), session.class_names,
                               {}, session.settings)
    return [p for p in preds if p is not None]
