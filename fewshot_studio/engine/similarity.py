"""Image similarity on cached embeddings ("find similar", the embedding map's input).

Features come from the embedding cache (:func:`cached_features`), never from the model: a
labeled folder has every feature there. Each image's feature ``(*feature_shape)`` is pooled
to one vector ``(C,)`` (:func:`pool_features`: a ``(C, h, w)`` map is averaged over its
spatial positions, a ``(d,)`` vector is kept) and images are compared by the cosine of those
vectors. numpy and torch on the CPU; no Qt, no model call.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fewshot_studio.engine.cache import EmbeddingCache, file_keys
from fewshot_studio.models import functional as Fn


def pool_features(feats: np.ndarray) -> np.ndarray:
    """``(n, *feature_shape)`` -> ``(n, C)`` float32: ``(n, d)`` unchanged, ``(n, C, h, w)``
    (or any ``(n, C, ...)``) averaged over the trailing (spatial) axes."""
    x = np.asarray(feats, dtype=np.float32)
    if x.ndim < 2:
        raise ValueError(f"expected (n, *feature_shape) features, got shape {x.shape}")
    if x.ndim > 2:
        x = x.reshape(x.shape[0], x.shape[1], -1).mean(axis=2)
    return np.ascontiguousarray(x)


def cosine_to(anchor: np.ndarray, feats: np.ndarray) -> np.ndarray:
    """Cosine similarity of ``(C,)`` ``anchor`` to each row of ``(n, C)`` ``feats`` ->
    ``(n,)`` float32 in [-1, 1] (0 for an all-zero row): the models' own cosine
    (:func:`~fewshot_studio.models.functional.cosine_logits` at scale 1)."""
    q = torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float32))
    a = torch.from_numpy(np.asarray(anchor, dtype=np.float32).reshape(1, -1))
    return Fn.cosine_logits(q, a, 1.0)[:, 0].numpy()


def rank_by_similarity(sims: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """``(n,)`` similarities -> ``(n,)`` int64 row order: most similar first, ties in row
    order, rows with ``valid`` False (no feature) last."""
    s = np.asarray(sims, dtype=np.float64)
    key = -s if valid is None else np.where(np.asarray(valid, bool), -s, np.inf)
    return np.lexsort((np.arange(len(s)), key)).astype(np.int64)


def most_similar(sims: np.ndarray, n: int, valid: np.ndarray | None = None,
                 exclude: Sequence[int] = ()) -> np.ndarray:
    """The ``n`` rows most similar (``(n,)`` int64, best first) among ``valid`` rows, leaving
    out ``exclude`` (the anchor itself, say); fewer when fewer qualify."""
    ok = np.ones(len(sims), bool) if valid is None else np.asarray(valid, bool).copy()
    ok[list(exclude)] = False
    order = rank_by_similarity(sims, ok)
    return order[:min(max(0, n), int(ok.sum()))]


@dataclass(frozen=True)
class FeatureTable:
    """Pooled features of some images: ``paths`` (n), ``feats`` ``(n, C)`` float32 (zeros
    where missing), ``valid`` ``(n,)`` bool (False: no cached feature, or a decode error)."""

    paths: list[Path]
    feats: np.ndarray
    valid: np.ndarray

    def row_of(self, path: Path) -> int | None:
        key = os.path.abspath(os.fspath(path))
        for i, p in enumerate(self.paths):
            if os.path.abspath(os.fspath(p)) == key:
                return i
        return None

    def similarities(self, row: int) -> np.ndarray:
        """``(n,)`` cosine similarity of every image to image ``row`` (-inf where invalid)."""
        sims = cosine_to(self.feats[row], self.feats)
        return np.where(self.valid, sims, -np.inf).astype(np.float32)


def cached_features(paths: Sequence[Path], feature_id: str,
                    cache_path: str | os.PathLike[str] | None = None) -> FeatureTable:
    """Pooled features of ``paths`` as a session cached them: ``feature_id`` is the key its
    last run stored them under (``LabelingSession.embedding.feature_id()``: the checkpoint's
    identity and feature format, plus int8 / test-time augmentation / a fine-tuned copy),
    ``cache_path`` the session's cache file (None: the default one). Images the cache does
    not hold under that key (never embedded, changed since) come back with ``valid`` False.
    Reads a separate connection: call it from a worker, not the UI thread."""
    with EmbeddingCache(cache_path) as cache:
        return _lookup(cache, [Path(p) for p in paths], feature_id)


def _lookup(cache: EmbeddingCache, paths: list[Path], feature_id: str) -> FeatureTable:
    keys = file_keys(paths)
    hits = cache.lookup(feature_id, [k for k in keys if k is not None])
    pooled: list[np.ndarray | None] = []  # pooled one by one: (n, C), never (n, C, h, w)
    for k in keys:
        e = hits.get(k.path) if k is not None else None
        f = e.feature if e is not None else None
        pooled.append(None if f is None else pool_features(f[None])[0])
    valid = np.array([r is not None for r in pooled], dtype=bool)
    dims = {r.shape for r in pooled if r is not None}
    if len(dims) != 1:  # nothing cached, or (never from one model) mixed shapes
        return FeatureTable(paths, np.zeros((len(paths), 0), np.float32),
                            np.zeros(len(paths), bool))
    (shape,) = dims
    feats = np.zeros((len(paths), *shape), np.float32)
    for i, r in enumerate(pooled):
        if r is not None:
            feats[i] = r
    return FeatureTable(paths, feats, valid)
