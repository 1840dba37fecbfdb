"""The support-dependent head of a labeling session: ``model.fit`` (or the many-shot head,
``LabelSettings.adapt``) on cached support features -> predictor -> probabilities -> the
unknown rule (``LabelSettings.unknown_rule``) -> :class:`~fewshot_studio.engine.api.Prediction`
per query. Always torch on the CPU; cheap, so every correction or new threshold recomputes
it all."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fewshot_studio.engine.api import (
    ADAPT_MODES,
    UNKNOWN_RULES,
    EngineCounters,
    LabelSettings,
    Prediction,
    Status,
)
from fewshot_studio.engine.query_store import _QueryStore
from fewshot_studio.errors import UserError
from fewshot_studio.models import functional as Fn
from fewshot_studio.models.base import FewShotClassifier, Predictor

_HEAD_CHUNK = 16384  # queries scored per predictor call (bounds the head's memory)
# Soft k-means iterations of the transductive refinement (Ren et al. 2018 use one). Two
# measured better on 1-shot episodes and about even on 5-shot ones (300 5-way episodes, 15
# queries per class): natural-protonet on Caltech-101 test classes 5w1s 95.61 (none) / 98.76
# (one) / 99.07 (two), 5w5s 98.92 / 99.24 / 99.28; omniglot-protonet 20w1s 90.59 / 96.05 /
# 96.92 (200 episodes). `fewshot-studio eval --transductive N` measures it.
TRANSDUCTIVE_ITERS = 2
# The many-shot head (adapt="head"/"auto"): L2 pull towards the prototypes' head, descent
# steps, and the most held-out folds (leave-one-out up to that many examples a class).
# Chosen on the dev sets with benchmarks/adapt_head.py.
HEAD_L2 = 1e-4
HEAD_STEPS = 50
MAX_FOLDS = 5
# The adaptive unknown rule keeps the labels it gives right this often on the held-out
# support examples (benchmarks/open_set.py).
UNKNOWN_PRECISION = 0.9
# Suspicious support examples (:meth:`PredictionHead.suspicious_examples`): an example is
# flagged when the support without it gives another class at least this calibrated
# probability. 0.6, not 0.5: an example between two look-alike classes (0.5 / 0.45) is
# ambiguous rather than wrong, and every false flag costs the user a look.
SUSPICIOUS_MIN_PROB = 0.6
# At most this many fits for the leave-one-out (one per example up to it; beyond, stratified
# folds: each holds out one example of every class at a time, see ``support_folds``).
LOO_MAX_FITS = 64


@dataclass(frozen=True, eq=False)
class Adapted:
    """A support set's predictor and what its held-out support examples say about it.

    ``kind``: "prototypes" (``model.fit``) or "head" (``model.fit_head``); ``prototypes``: the
    prototypes' predictor. Per held-out example (``m`` of them; none when every class has a
    single example): ``heldout_prob (m,)`` the predicted class's calibrated probability,
    ``heldout_correct (m,)`` bool, ``heldout_typical (m,)``: how typical of a known class
    each looks, the prototypes' largest calibrated logit (``logits / temperature``: the
    model's own similarity; a linear head's logits can grow away from the examples)."""

    predictor: Predictor
    kind: str
    prototypes: Predictor
    heldout_prob: Tensor
    heldout_correct: Tensor
    heldout_typical: Tensor

    @property
    def has_heldout(self) -> bool:
        return self.heldout_prob.numel() > 0

    def min_prob(self, precision: float = UNKNOWN_PRECISION) -> float:
        """The adaptive rule's probability floor
        (:func:`~fewshot_studio.models.functional.precision_threshold`)."""
        return Fn.precision_threshold(self.heldout_prob, self.heldout_correct, precision)

    def typicality(self, top_logit: Tensor) -> Tensor:
        """``(n,)`` the prototypes' largest calibrated logits -> ``(n,)`` conformal p-values
        against the held-out examples: an image of a known class gets one <= ``a`` with
        probability <= ``a``."""
        return Fn.conformal_pvalues(self.heldout_typical, top_logit.float())


def is_unknown(top_prob: np.ndarray, typicality: np.ndarray, min_prob: float,
               miss_rate: float) -> np.ndarray:
    """The unknown decision: ``(n,)`` top probabilities and typicality p-values -> ``(n,)``
    bool, True for a top probability below ``min_prob`` or a p-value <= ``miss_rate`` (the
    fixed rule: ``min_prob`` is the threshold and ``miss_rate`` 0)."""
    return (top_prob < min_prob) | (typicality <= miss_rate)


def adapt_to_support(model: FewShotClassifier, x: Tensor, y: Tensor, n_way: int, adapt: str,
                     temperature: float = 1.0, held_out_needed: bool = True) -> Adapted:
    """Fit ``model`` to ``(n_s, *feature_shape)`` support features ``x`` with labels ``y``
    ``(n_s,)``: prototypes (``adapt="none"``), the many-shot logistic-regression head
    (``"head"``, methods with ``linear_head``) or ``"auto"``: the head unless the prototypes
    are right on more held-out support examples (:func:`~fewshot_studio.models.functional.
    support_folds`: leave-one-out up to ``MAX_FOLDS`` examples a class); prototypes when no
    class has two examples. ``held_out_needed``: also score the held-out folds for the
    adaptive unknown rule (``"auto"`` with a head always does)."""
    held = Fn.support_folds(y, n_way, MAX_FOLDS)  # (F, n_s)
    protos = model.fit(x, y, n_way)
    use_head = adapt in ("head", "auto") and model.linear_head
    empty = torch.zeros(0)
    if held.shape[0] == 0 or not (held_out_needed or (adapt == "auto" and use_head)):
        if adapt == "head" and model.linear_head:
            head, _ = model.fit_head(x, y, n_way, held[:0], HEAD_L2, HEAD_STEPS)
            return Adapted(head, "head", protos, empty, empty.bool(), empty)
        return Adapted(protos, "prototypes", protos, empty, empty.bool(), empty)
    fold_logits = torch.stack([model.fit(x[~h], y[~h], n_way)(x) for h in held])
    proto_logits, index = Fn.heldout_logits(fold_logits, held)  # (m, n_way), (m,)
    truth = y[index]
    t = float(temperature)
    predictor: Predictor = protos
    kind, logits = "prototypes", proto_logits.detach().float() / t
    typical = logits.max(-1).values
    if use_head:
        head, head_folds = model.fit_head(x, y, n_way, held, HEAD_L2, HEAD_STEPS)
        head_logits, _ = Fn.heldout_logits(head_folds, held)
        if adapt == "head" or (int((head_logits.argmax(-1) == truth).sum())
                               >= int((proto_logits.argmax(-1) == truth).sum())):
            predictor, kind = head, "head"
            logits = head_logits.detach().float() / t
    top_p, top_i = torch.softmax(logits, dim=-1).max(-1)
    return Adapted(predictor, kind, protos, top_p, top_i == truth, typical)


def leave_one_out_logits(model: FewShotClassifier, x: Tensor, y: Tensor, n_way: int,
                         candidates: Tensor, max_fits: int = LOO_MAX_FITS
                         ) -> tuple[Tensor, Tensor]:
    """Each candidate support example's logits from ``model.fit`` on the support without it.

    ``x (n_s, *feature_shape)`` support features, ``y (n_s,)`` labels, ``candidates (n_s,)``
    bool: the examples to score. An example whose class has no other example is skipped
    (without it the class would be empty). Up to ``max_fits`` such examples, one fit each
    (exact leave-one-out); beyond, ``max_fits`` stratified folds
    (:func:`~fewshot_studio.models.functional.support_folds`) bound the cost. Only the
    method's ``fit`` contract is used. Returns ``(index (m,), logits (m, n_way))``, ``index``
    ascending. The caller picks grad mode (MAML's ``fit`` needs gradients)."""
    counts = torch.bincount(y.long(), minlength=n_way)
    eligible = candidates.bool() & (counts[y.long()] >= 2)
    index = torch.nonzero(eligible).flatten()
    if index.numel() == 0:
        return index, torch.zeros(0, n_way)
    if index.numel() <= max_fits:
        held = torch.zeros(index.numel(), y.numel(), dtype=torch.bool)
        held[torch.arange(index.numel()), index] = True  # (m, n_s): fold i holds out index[i]
    else:
        held = Fn.support_folds(y, n_way, max_fits) & eligible  # (F, n_s)
    out = torch.zeros(y.numel(), n_way)
    for h in held:
        if not bool(h.any()):
            continue
        predictor = model.fit(x[~h], y[~h], n_way)
        with torch.no_grad():
            out[h] = predictor(x[h]).detach().float()
    return index, out[index]


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
    _adapted: Adapted | None = None  # the last fit of the support set (_predictor)
    # (support key, result) of the last suspicious_examples call
    _suspicious_memo: tuple[tuple[Any, ...], dict[Path, str]] | None = None

    def _support_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The support set's ``(n_s, *feature_shape)`` features and ``(n_s,)`` labels."""
        x, y, _ = self._support_rows()
        return x, y

    def _support_rows(self) -> tuple[torch.Tensor, torch.Tensor, list[Path]]:
        """:meth:`_support_tensors` and each row's path; the class examples (in class
        order) come first, then the corrected images that join them."""
        feats: list[np.ndarray] = []
        labels: list[int] = []
        paths: list[Path] = []
        for c, name in enumerate(self.class_names):
            for p in self._support[name]:
                f = self._support_feats.get(p)
                if isinstance(f, np.ndarray):
                    feats.append(f)
                    labels.append(c)
                    paths.append(p)
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
                    paths.append(p)
        x = torch.from_numpy(np.stack(feats).astype(np.float32, copy=False))
        return x, torch.tensor(labels, dtype=torch.long), paths

    def _predictor(self, refine_on: np.ndarray | None = None) -> Callable[[torch.Tensor],
                                                                           torch.Tensor]:
        """Fit the support set (:func:`adapt_to_support`; kept in ``self._adapted`` for the
        unknown rule) and return its predictor, refined over the queries ``refine_on`` when
        transductive (prototypes only; with transductive refinement ``auto`` keeps them)."""
        if self.settings.adapt not in ADAPT_MODES:
            raise UserError(f"adapt must be one of {', '.join(ADAPT_MODES)}, not "
                            f"{self.settings.adapt!r}")
        if self.settings.unknown_rule not in UNKNOWN_RULES:
            raise UserError(f"unknown_rule must be one of {', '.join(UNKNOWN_RULES)}, not "
                            f"{self.settings.unknown_rule!r}")
        x, y = self._support_tensors()
        adapt = self.settings.adapt
        if adapt == "auto" and self.settings.transductive:
            adapt = "none"  # transductive refinement is of prototypes
        with torch.enable_grad(), self._head_threads():  # MAML adapts with gradients
            self._adapted = adapt_to_support(
                self.model, x, y, len(self.class_names), adapt, self.temperature,
                held_out_needed=self.settings.unknown_rule == "adaptive")
        predictor = self._adapted.predictor
        self.counters.extra[f"fit_{self._adapted.kind}"] = (
            self.counters.extra.get(f"fit_{self._adapted.kind}", 0) + 1)
        if (refine_on is not None and len(refine_on) and self.model.supports_refinement
                and self._adapted.kind == "prototypes"):
            with torch.no_grad(), self._head_threads():
                q = self._store.rows(refine_on)
                predictor = predictor.refine(q, n_iters=TRANSDUCTIVE_ITERS)
            self.counters.extra["transductive"] = self.counters.extra.get("transductive", 0) + 1
        return predictor

    def suspicious_examples(self, min_prob: float = SUSPICIOUS_MIN_PROB) -> dict[Path, str]:
        """Class examples that look like another class: example path -> that class's name.

        Each example (of a class with at least two; corrected images that join the support
        count, but are never flagged themselves) is predicted by ``model.fit`` on the support
        without it (:func:`leave_one_out_logits`; temperature-scaled probabilities); it is
        flagged when the top class is not its own, with probability >= ``min_prob``. Uses
        the cached support features only (call it after :meth:`run` / :meth:`relabel`;
        examples not embedded yet are left out); remembered until the support changes."""
        if len(self.class_names) < 2 or not any(
                isinstance(self._support_feats.get(p), np.ndarray)
                for ps in self._support.values() for p in ps):
            return {}
        x, y, paths = self._support_rows()
        key = (tuple(paths), tuple(y.tolist()), hash(x.numpy().tobytes()),
               float(self.temperature), float(min_prob))
        memo = self._suspicious_memo
        if memo is not None and memo[0] == key:
            return dict(memo[1])
        n_examples = sum(isinstance(self._support_feats.get(p), np.ndarray)
                         for ps in self._support.values() for p in ps)
        candidates = torch.arange(len(paths)) < n_examples  # the class examples come first
        with torch.enable_grad(), self._head_threads():  # MAML adapts with gradients
            index, logits = leave_one_out_logits(self.model, x, y, len(self.class_names),
                                                 candidates)
        out: dict[Path, str] = {}
        if index.numel():
            with torch.no_grad():
                top_p, top_i = self._probabilities(logits).max(-1)
            for i, p, c in zip(index.tolist(), top_p.tolist(), top_i.tolist(), strict=True):
                if c != int(y[i]) and p >= min_prob:
                    out[paths[i]] = self.class_names[c]
        self._suspicious_memo = (key, out)
        self.counters.extra["suspicious_checks"] = (
            self.counters.extra.get("suspicious_checks", 0) + 1)
        return dict(out)

    @property
    def head_kind(self) -> str:
        """What labels the queries: "prototypes" or "head" (the many-shot head); "" before
        the first fit."""
        return self._adapted.kind if self._adapted is not None else ""

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
        """``(n, *feature_shape)`` features -> ``(n, n_way)`` probabilities (see
        :meth:`_scorer`)."""
        score = self._scorer(predictor)

        def probabilities(q: torch.Tensor) -> torch.Tensor:
            return score(q)[0]

        probabilities.__name__ = score.__name__  # "fast" | "generic"
        return probabilities

    def _scorer(self, predictor: Callable[[torch.Tensor], torch.Tensor],
                also: Callable[[torch.Tensor], torch.Tensor] | None = None, top: bool = True
                ) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]:
        """``(n, *feature_shape)`` features -> ``((n, n_way)`` probabilities, ``(n,)`` largest
        calibrated logit ``max(logits) / temperature``, of ``also`` when given (the
        prototypes, when the many-shot head labels: see :attr:`Adapted.heldout_typical`);
        None when not ``top`` (only the adaptive unknown rule reads it)).

        A Euclidean ProtoNet predictor takes a fast path: ``-s * ||q - p||^2`` is
        ``s * (2 q.p - ||p||^2) - s ||q||^2`` (one matrix product; the per-row ``||q||^2``
        leaves the softmax alone and only shifts the largest logit). Anything else: softmax of
        ``predictor(q)`` (or the model's own ``probabilities(logits)`` when it has one). Both
        divide the logits by the checkpoint's calibration ``temperature`` (the fast path folds
        ``1/T`` into ``s``)."""
        protos = getattr(predictor, "prototypes", None)
        owner = getattr(predictor, "model", None)
        if (isinstance(protos, torch.Tensor) and owner is self.model and also is None
                and getattr(owner, "distance", None) == "euclidean"
                and not callable(getattr(self.model, "probabilities", None))):
            scale = float(getattr(owner, "scale", 1.0)) / float(self.temperature)
            p = protos.detach().reshape(protos.shape[0], -1).float()
            p2, psq = 2.0 * scale * p, (scale * p.pow(2).sum(-1)).unsqueeze(-1)

            def fast(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
                # (n_way, d) @ (d, n): ~2x faster than (n, d) @ (d, n_way) for a few classes
                flat = q.reshape(q.shape[0], -1)
                logits = (p2 @ flat.t() - psq).t()
                largest = (logits.max(-1).values
                           - scale * torch.linalg.vector_norm(flat, dim=-1).square()
                           if top else None)
                return torch.softmax(logits, dim=-1), largest

            return fast

        t = float(self.temperature)

        typical = self._scorer(also) if also is not None and top else None

        def generic(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
            logits = predictor(q)
            if typical is not None:  # the prototypes' (fast) scorer
                return self._probabilities(logits), typical(q)[1]
            largest = logits.float().max(-1).values / t if top else None
            return self._probabilities(logits), largest

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

    def _head_chunk(self, score: Callable[[torch.Tensor], Any]) -> int:
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
        """``predictor=None``: reuse the stored top-k and typicality (a new threshold or
        miss rate needs no head). Unknown (:func:`is_unknown`): with
        ``unknown_rule="adaptive"`` and held-out support examples, a top probability below
        :meth:`Adapted.min_prob` or a typicality p-value <= ``miss_rate``; else a top
        probability below ``unknown_threshold``."""
        st = self._store
        names = self.class_names
        adapted = self._adapted
        if (adapted is not None and adapted.has_heldout
                and self.settings.unknown_rule == "adaptive"):
            min_prob, miss_rate = adapted.min_prob(), float(self.settings.miss_rate)
        else:
            adapted = None  # the fixed threshold
            min_prob, miss_rate = float(self.settings.unknown_threshold), 0.0
        index = st.index
        corr = {index[p]: lab for p, lab in self._corrections.items() if p in index}
        preds = self._preds
        paths = st.paths
        k = min(3, len(names))
        also = adapted.prototypes if adapted is not None and adapted.kind == "head" else None
        score = (self._scorer(predictor, also, top=adapted is not None)
                 if predictor is not None else None)
        names_arr = np.array(names, dtype=object)
        chunk = self._head_chunk(score) if score is not None else _HEAD_CHUNK
        if st.top_p is None or st.top_p.shape[1] != k:
            st.top_p = np.zeros((st.n, k), np.float32)
            st.top_i = np.zeros((st.n, k), np.int64)
            st.typical = np.ones(st.n, np.float32)
        assert st.top_i is not None and st.typical is not None
        ok_, unknown_, error_ = Status.OK, Status.UNKNOWN, Status.ERROR
        for c0 in range(start, stop, chunk):
            c1 = min(stop, c0 + chunk)
            valid = st.valid[c0:c1].tolist()
            done = st.done[c0:c1].tolist()
            tops: list[tuple[tuple[str, float], ...]] = []
            unknown: list[bool] = []
            if any(valid):
                if score is not None:
                    with torch.no_grad(), self._head_threads():
                        probs, top = score(st.block(c0, c1))
                        top_p, top_i = probs.topk(k, dim=1)
                        if adapted is not None and top is not None:
                            st.typical[c0:c1] = adapted.typicality(top).numpy()
                    st.top_p[c0:c1], st.top_i[c0:c1] = top_p.numpy(), top_i.numpy()
                unknown = is_unknown(st.top_p[c0:c1, 0], st.typical[c0:c1], min_prob,
                                     miss_rate).tolist()
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
                elif unknown[j]:
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
