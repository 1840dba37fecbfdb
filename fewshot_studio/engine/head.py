"""The support-dependent head of a labeling session: ``model.fit`` on cached support features
-> predictor -> probabilities -> :class:`~fewshot_studio.engine.api.Prediction` per query.
Always torch on the CPU; cheap, so every correction or new threshold recomputes it all."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fewshot_studio.engine.api import EngineCounters, LabelSettings, Prediction, Status
from fewshot_studio.engine.query_store import _QueryStore

_HEAD_CHUNK = 16384  # queries scored per predictor call (bounds the head's memory)
# Soft k-means iterations of the transductive refinement (Ren et al. 2018 use one). Two
# measured better on 1-shot episodes and about even on 5-shot ones (300 5-way episodes, 15
# queries per class): natural-protonet on Caltech-101 test classes 5w1s 95.61 (none) / 98.76
# (one) / 99.07 (two), 5w5s 98.92 / 99.24 / 99.28; omniglot-protonet 20w1s 90.59 / 96.05 /
# 96.92 (200 episodes). `fewshot-studio eval --transductive N` measures it.
TRANSDUCTIVE_ITERS = 2


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Run a block with ``n`` torch intra-op threads (restored after)."""
    old = torch.get_num_threads()
    if old == n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class PredictionHead:
    """Mixin of :class:`~fewshot_studio.engine.session.LabelingSession`: the head (support
    tensors, predictor, scorer) and the predictions it gives. Uses the session's state."""

    model: Any
    settings: LabelSettings
    counters: EngineCounters
    class_names: list[str]
    _identity_embed: bool
    _support: dict[str, list[Path]]
    _support_feats: dict[Path, np.ndarray | str]
    _corrections: dict[Path, str]
    _corrected_feats: dict[Path, np.ndarray]
    _store: _QueryStore
    _preds: list[Prediction | None]
    _support_dirty: bool
    temperature: float = 1.0  # logits / T before the softmax (calibration); set per checkpoint

    def _support_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        feats: list[np.ndarray] = []
        labels: list[int] = []
        for c, name in enumerate(self.class_names):
            for p in self._support[name]:
                f = self._support_feats.get(p)
                if isinstance(f, np.ndarray):
                    feats.append(f)
                    labels.append(c)
        if self.settings.corrections_join_support:
            cls = {n: i for i, n in enumerate(self.class_names)}
            for p, label in sorted(self._corrections.items()):
                if label not in cls or p in self._support[label]:
                    continue
                f = self._corrected_feats.get(p)
                if f is None and p in self._store.index:
                    f = self._store.feature(self._store.index[p])
                    if f is not None:
                        self._corrected_feats[p] = f
                if f is not None:
                    feats.append(f)
                    labels.append(cls[label])
        x = torch.from_numpy(np.stack(feats).astype(np.float32, copy=False))
        return x, torch.tensor(labels, dtype=torch.long)

    def _predictor(self, refine_on: np.ndarray | None = None) -> Callable[[torch.Tensor],
                                                                           torch.Tensor]:
        x, y = self._support_tensors()
        with torch.enable_grad(), self._head_threads():  # MAML adapts with gradients
            predictor = self.model.fit(x, y, len(self.class_names))
        if refine_on is not None and len(refine_on) and self.model.can_refine:
            with torch.no_grad(), self._head_threads():
                q = self._store.rows(refine_on)
                predictor = predictor.refine(q, n_iters=TRANSDUCTIVE_ITERS)
            self.counters.extra["transductive"] = self.counters.extra.get("transductive", 0) + 1
        return predictor

    def _head_threads(self) -> contextlib.AbstractContextManager[None]:
        """The head runs single-threaded: its tensors are small, and torch's intra-op
        threads cost milliseconds per call on a busy 2-core machine. Full MAML (whose head is
        the whole network) keeps torch's threads."""
        return contextlib.nullcontext() if self._identity_embed else _torch_threads(1)

    def _probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """``(n, n_way)`` logits -> probabilities of ``logits / temperature``."""
        t = float(self.temperature)
        if t != 1.0:
            logits = logits / t
        fn = getattr(self.model, "probabilities", None)
        if callable(fn):
            return fn(logits)
        return torch.softmax(logits.float(), dim=-1)

    def scorer(self, predictor: Callable[[torch.Tensor], torch.Tensor]
               ) -> Callable[[torch.Tensor], torch.Tensor]:
        """``(n, *feature_shape)`` features -> ``(n, n_way)`` probabilities.

        A Euclidean ProtoNet predictor takes a fast path: softmax is unchanged by a per-row
        constant, so ``-s * ||q - p||^2`` becomes ``s * (2 q.p - ||p||^2)`` (one matrix
        product, no pass over ``||q||^2``). Anything else: softmax of ``predictor(q)`` (or the
        model's own ``probabilities(logits)`` when it has one). Both divide the logits by the
        checkpoint's calibration ``temperature`` (the fast path folds ``1/T`` into ``s``)."""
        protos = getattr(predictor, "prototypes", None)
        owner = getattr(predictor, "model", None)
        if (isinstance(protos, torch.Tensor) and owner is self.model
                and getattr(owner, "distance", None) == "euclidean"
                and not callable(getattr(self.model, "probabilities", None))):
            scale = float(getattr(owner, "scale", 1.0)) / float(self.temperature)
            p = protos.detach().reshape(protos.shape[0], -1).float()
            p2, psq = 2.0 * scale * p, (scale * p.pow(2).sum(-1)).unsqueeze(-1)

            def fast(q: torch.Tensor) -> torch.Tensor:
                # (n_way, d) @ (d, n): ~2x faster than (n, d) @ (d, n_way) for a few classes
                logits = p2 @ q.reshape(q.shape[0], -1).t() - psq
                return torch.softmax(logits.t(), dim=-1)

            return fast

        def generic(q: torch.Tensor) -> torch.Tensor:
            return self._probabilities(predictor(q))

        return generic

    def _predict_range(self, predictor: Callable[[torch.Tensor], torch.Tensor] | None,
                       start: int, stop: int) -> None:
        """Recompute ``self._preds`` for the processed queries in ``[start, stop)``.
        The cyclic GC is paused meanwhile: tens of thousands of new acyclic objects would
        otherwise trigger full collections over everything alive (tens of ms)."""
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            self._predict_range_unpaused(predictor, start, stop)
        finally:
            if was_enabled:
                gc.enable()

    def _head_chunk(self, score: Callable[[torch.Tensor], torch.Tensor]) -> int:
        """Queries per head call: all of them for the ProtoNet fast path (a view and one
        matrix product); else ~64 MB of features x classes (relation pairs); 64 images for
        full MAML, whose head is the whole network (its predictor normalises queries with
        support-set statistics, so the chunking does not change any prediction)."""
        if getattr(score, "__name__", "") == "fast":
            return _HEAD_CHUNK
        if self._identity_embed:
            return 64
        d = max(1, int(np.prod(self._store.feature_shape or (1,))))
        return int(max(32, min(_HEAD_CHUNK, (64 << 20) // (4 * d * max(1, len(self.class_names))))))

    def _predict_range_unpaused(self, predictor: Callable[[torch.Tensor], torch.Tensor] | None,
                                start: int, stop: int) -> None:
        """``predictor=None``: reuse the stored top-k (a new threshold needs no head)."""
        st = self._store
        names = self.class_names
        thr = float(self.settings.unknown_threshold)
        index = st.index
        corr = {index[p]: lab for p, lab in self._corrections.items() if p in index}
        preds = self._preds
        paths = st.paths
        k = min(3, len(names))
        score = self.scorer(predictor) if predictor is not None else None
        names_arr = np.array(names, dtype=object)
        chunk = self._head_chunk(score) if score is not None else _HEAD_CHUNK
        if st.top_p is None or st.top_p.shape[1] != k:
            st.top_p = np.zeros((st.n, k), np.float32)
            st.top_i = np.zeros((st.n, k), np.int64)
        assert st.top_i is not None
        ok_, unknown_, error_ = Status.OK, Status.UNKNOWN, Status.ERROR
        for c0 in range(start, stop, chunk):
            c1 = min(stop, c0 + chunk)
            valid = st.valid[c0:c1].tolist()
            done = st.done[c0:c1].tolist()
            tops: list[tuple[tuple[str, float], ...]] = []
            if any(valid):
                if score is not None:
                    with torch.no_grad(), self._head_threads():
                        top_p, top_i = score(st.block(c0, c1)).topk(k, dim=1)
                    st.top_p[c0:c1], st.top_i[c0:c1] = top_p.numpy(), top_i.numpy()
                # numpy's tolist is faster than torch's; top-k pairs built by zip
                tops = list(map(tuple, map(zip, names_arr[st.top_i[c0:c1]].tolist(),
                                           st.top_p[c0:c1].tolist())))
            for j, (path, is_done, is_valid) in enumerate(zip(paths[c0:c1], done, valid,
                                                              strict=True)):
                if not is_done:
                    continue
                i = c0 + j
                label = corr.get(i) if corr else None
                if not is_valid:
                    reason = st.errors.get(i, "not processed")
                    preds[i] = (Prediction(path, label, 1.0, 1.0, ok_, (), reason, True)
                                if label is not None else
                                Prediction(path, None, 0.0, 0.0, error_, (), reason))
                    continue
                top = tops[j]
                p0 = top[0][1]
                margin = p0 - top[1][1] if k > 1 else p0
                if label is not None:
                    preds[i] = Prediction(path, label, 1.0, 1.0, ok_, top, "", True)
                elif p0 < thr:
                    preds[i] = Prediction(path, None, p0, margin, unknown_, top)
                else:
                    preds[i] = Prediction(path, top[0][0], p0, margin, ok_, top)

    def _relabel_all(self) -> list[Prediction]:
        """Recompute every processed query's prediction from cached features."""
        st = self._store
        if st.done.any():
            refine = np.flatnonzero(st.valid) if self.settings.transductive else None
            self._predict_range(self._predictor(refine), 0, st.n)
        self._support_dirty = False
        self.counters.relabels += 1
        return self.predictions()

    def predictions(self) -> list[Prediction]:
        """Every processed query's prediction, sorted by path."""
        return [p for p in self._preds if p is not None]
