"""Where the Ray path meets the engine, in one place, through the session's public calls:
workers embed with ``session.embedding`` (an
:class:`~fewshot_studio.engine.embedding.EmbeddingPipeline`: cache, decode, backend and
error reasons exactly as a local run); the driver fits the head once (``session.run`` over
no query) and labels one batch of features at a time with
:meth:`~fewshot_studio.engine.session.LabelingSession.predict_features`. Every labeling
decision (probabilities, temperature, adaptation, unknown rule) stays in
:mod:`fewshot_studio.engine.head`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fewshot_studio.engine.session import LabelingSession

Result = np.ndarray | str  # an image's feature, or why it has none


def embed_paths(session: LabelingSession, paths: Sequence[Path]) -> list[Result]:
    """Features (``(*feature_shape)`` float32) or error reasons of ``paths``, in order,
    through the session's pipeline."""
    out: list[Result] = []
    for _, results in session.embedding.stream(list(paths)):
        out.extend(results)
    return out


def fit_head(session: LabelingSession) -> tuple[int, ...]:
    """Embed the support set (through the cache) and fit the head exactly as
    :meth:`LabelingSession.run` does before its first batch (it is that code: a run over no
    query). UserError for a class without a readable example. Returns the feature shape
    (the backend embeds one blank image)."""
    for _ in session.run([]):
        pass
    session.prepare()
    pre = session.preprocess
    blank = np.zeros((1, pre.channels, pre.image_size, pre.image_size), np.float32)
    return tuple(session.embedding.embed_arrays(blank).shape[1:])
