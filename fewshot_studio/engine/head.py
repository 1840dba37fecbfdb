"""The support-dependent head of a labeling session: ``model.fit`` (or the many-shot head,
``LabelSettings.adapt``) on cached support features -> predictor -> probabilities -> the
unknown rule (``LabelSettings.unknown_rule``) -> :class:`~fewshot_studio.engine.api.Prediction`
per query. Always torch on the CPU; cheap, so every correction or new threshold recomputes
it all."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

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
from fewshot_studio.models.base import FewShotClassifier, LinearLogits, Predictor

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
# Suspicious support examples (:meth:`PredictionHead.suspicious`): an example is
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


ScoreFn = Callable[[Tensor], tuple[Tensor, Tensor | None]]


@dataclass(frozen=True, eq=False)
class Scorer:
    """``(n, *feature_shape)`` query features -> ``((n, n_way)`` probabilities, ``(n,)``
    largest calibrated logit or None)``. ``linear``: the declared one-matrix-product path
    (:meth:`~fewshot_studio.models.base.FewShotClassifier.linear_logits`), cheap enough to
    score every query in one call."""

    score: ScoreFn
    linear: bool

    def __call__(self, q: Tensor) -> tuple[Tensor, Tensor | None]:
        return self.score(q)

    def probabilities(self, q: Tensor) -> Tensor:
        """``(n, *feature_shape)`` -> ``(n, n_way)`` probabilities."""
        return self.score(q)[0]


class PredictionHead:
    """The support-dependent half of a labeling session: support features -> predictor
    (:meth:`fit`) -> probabilities (:meth:`scorer`) -> a Prediction per query
    (:meth:`predict_range`). Owns the last fit (:attr:`adapted`, read by the unknown rule)
    and the memo of :meth:`suspicious`; counts into ``counters``. ``temperature``: the
    checkpoint's calibration (logits / T before the softmax)."""

    def __init__(self, model: FewShotClassifier, temperature: float,
                 counters: EngineCounters) -> None:
        self.model = model
        self.temperature = float(temperature)
        self.counters = counters
        self.adapted: Adapted | None = None
        # (support key, result) of the last suspicious() call
        self._suspicious_memo: tuple[tuple[object, ...], dict[Path, str]] | None = None

    @property
    def kind(self) -> str:
        """What labels the queries: "prototypes" or "head" (the many-shot head); "" before
        the first fit."""
        return self.adapted.kind if self.adapted is not None else ""

    def _count(self, name: str) -> None:
        self.counters.extra[name] = self.counters.extra.get(name, 0) + 1

    def _threads(self) -> contextlib.AbstractContextManager[None]:
        """The head runs single-threaded: its tensors are small, and torch's intra-op
        threads cost milliseconds per call on a busy 2-core machine. Full MAML (whose head is
        the whole network: it declares ``embed_is_identity``) keeps torch's threads."""
        return contextlib.nullcontext() if self.model.embed_is_identity else _torch_threads(1)

    def fit(self, x: Tensor, y: Tensor, n_way: int, settings: LabelSettings,
            refine_on: Callable[[], Tensor | None] | None = None) -> Predictor:
        """Fit ``(n_s, *feature_shape)`` support features ``x`` with labels ``y`` ``(n_s,)``
        (:func:`adapt_to_support`; kept in :attr:`adapted` for the unknown rule) and return
        the predictor, refined over the ``(n_q, *feature_shape)`` query features
        ``refine_on()`` (None: no queries) when given (transductive: for methods that declare
        ``supports_refinement``, prototypes only; with it ``auto`` keeps them)."""
        if settings.adapt not in ADAPT_MODES:
            raise UserError(f"adapt must be one of {', '.join(ADAPT_MODES)}, not "
                            f"{settings.adapt!r}")
        if settings.unknown_rule not in UNKNOWN_RULES:
            raise UserError(f"unknown_rule must be one of {', '.join(UNKNOWN_RULES)}, not "
                            f"{settings.unknown_rule!r}")
        adapt = settings.adapt
        if adapt == "finetune":
            adapt = "none"  # the prototypes of the fine-tuned model's features
        if adapt == "auto" and settings.transductive:
            adapt = "none"  # transductive refinement is of prototypes
        with torch.enable_grad(), self._threads():  # MAML adapts with gradients
            self.adapted = adapt_to_support(
                self.model, x, y, n_way, adapt, self.temperature,
                held_out_needed=settings.unknown_rule == "adaptive")
        predictor = self.adapted.predictor
        self._count(f"fit_{self.adapted.kind}")
        if (refine_on is not None and self.model.supports_refinement
                and self.adapted.kind == "prototypes"):
            with torch.no_grad(), self._threads():
                q = refine_on()
                if q is not None:
                    predictor = predictor.refine(q, n_iters=TRANSDUCTIVE_ITERS)  # type: ignore[attr-defined]
                    self._count("transductive")
        return predictor

    def suspicious(self, x: Tensor, y: Tensor, paths: Sequence[Path], n_examples: int,
                   names: Sequence[str], min_prob: float = SUSPICIOUS_MIN_PROB
                   ) -> dict[Path, str]:
        """Support rows that look like another class: path -> that class's name.

        ``x (n_s, *feature_shape)``, ``y (n_s,)``, ``paths``: the support rows, the first
        ``n_examples`` of them class examples (the rest, corrected images, count but are never
        flagged). Each example (of a class with at least two) is predicted by ``model.fit``
        on the support without it (:func:`leave_one_out_logits`; temperature-scaled
        probabilities); it is flagged when the top class is not its own, with probability
        >= ``min_prob``. Remembered until the rows change."""
        key = (tuple(paths), tuple(y.tolist()), hash(x.numpy().tobytes()),
               self.temperature, float(min_prob))
        memo = self._suspicious_memo
        if memo is not None and memo[0] == key:
            return dict(memo[1])
        candidates = torch.arange(len(paths)) < n_examples
        with torch.enable_grad(), self._threads():  # MAML adapts with gradients
            index, logits = leave_one_out_logits(self.model, x, y, len(names), candidates)
        out: dict[Path, str] = {}
        if index.numel():
            with torch.no_grad():
                top_p, top_i = self.probabilities(logits).max(-1)
            for i, p, c in zip(index.tolist(), top_p.tolist(), top_i.tolist(), strict=True):
                if c != int(y[i]) and p >= min_prob:
                    out[paths[i]] = names[c]
        self._suspicious_memo = (key, out)
        self._count("suspicious_checks")
        return dict(out)

    def probabilities(self, logits: Tensor) -> Tensor:
        """``(n, n_way)`` logits -> the model's probabilities of ``logits / temperature``."""
        return self.model.probabilities(logits, self.temperature)

    def scorer(self, predictor: Predictor, also: Predictor | None = None,
               top: bool = True) -> Scorer:
        """``(n, *feature_shape)`` features -> ``((n, n_way)`` probabilities, ``(n,)`` largest
        calibrated logit ``max(logits) / temperature``, of ``also`` when given (the
        prototypes, when the many-shot head labels: see :attr:`Adapted.heldout_typical`);
        None when not ``top`` (only the adaptive unknown rule reads it)).

        Predictors whose method declares :meth:`~fewshot_studio.models.base.
        FewShotClassifier.linear_logits` (Euclidean ProtoNet's) are scored in one matrix
        product (:meth:`_linear_score`). Anything else: the model's probabilities of
        ``predictor(q)``. Both divide the logits by the checkpoint's ``temperature``."""
        typical = also if also is not None and top else None
        form = self.model.linear_logits(predictor)
        typical_form = self.model.linear_logits(typical) if typical is not None else None
        if form is not None and (typical is None or typical_form is not None):
            return Scorer(self._linear_score(form, typical_form, top), linear=True)
        t = self.temperature
        typical_scorer = self.scorer(typical) if typical is not None else None

        def generic(q: Tensor) -> tuple[Tensor, Tensor | None]:
            logits = predictor(q)
            if typical_scorer is not None:
                return self.probabilities(logits), typical_scorer(q)[1]
            largest = logits.float().max(-1).values / t if top else None
            return self.probabilities(logits), largest

        return Scorer(generic, linear=False)

    def _linear_score(self, form: LinearLogits, typical: LinearLogits | None,
                      top: bool) -> ScoreFn:
        """The one-matrix-product scorer of ``form``: ``1 / temperature`` folded into its
        scale, the per-query ``|q|^2`` term left out of the probabilities (the softmax
        ignores it) and added back to the largest logit, read off ``typical`` when given
        (scored in the same product) else off ``form``."""
        forms = [form] if typical is None else [form, typical]
        scales = [f.scale / self.temperature for f in forms]
        w = torch.cat([sc * f.weight for sc, f in zip(scales, forms, strict=True)])
        b = torch.cat([sc * f.bias for sc, f in zip(scales, forms, strict=True)]).unsqueeze(-1)
        n_way = form.weight.shape[0]
        norm_scale = scales[-1] * forms[-1].norm_coef

        def linear(q: Tensor) -> tuple[Tensor, Tensor | None]:
            # (n_way, d) @ (d, n): ~2x faster than (n, d) @ (d, n_way) for a few classes
            flat = q.reshape(q.shape[0], -1)
            logits = (w @ flat.t() + b).t()  # (n, n_way) or (n, 2 n_way) with typical
            largest = None
            if top:
                largest = (logits[:, -forms[-1].weight.shape[0]:].max(-1).values
                           - norm_scale * torch.linalg.vector_norm(flat, dim=-1).square())
            return self.model.probabilities(logits[:, :n_way]), largest

        return linear

    def _chunk(self, scorer: Scorer, feature_shape: tuple[int, ...], n_way: int) -> int:
        """Queries per head call: all of them for the linear path (a view and one matrix
        product); else ~64 MB of features x classes (relation pairs); 64 images for full
        MAML, whose head is the whole network (its predictor normalises queries with
        support-set statistics, so the chunking does not change any prediction)."""
        if scorer.linear:
            return _HEAD_CHUNK
        if self.model.embed_is_identity:
            return 64
        d = max(1, int(np.prod(feature_shape or (1,))))
        return int(max(32, min(_HEAD_CHUNK, (64 << 20) // (4 * d * max(1, n_way)))))

    def _rule(self, settings: LabelSettings) -> tuple[Adapted | None, float, float]:
        """The unknown rule: ``(adapted, min_prob, miss_rate)``; ``adapted`` None for the fixed
        threshold (``unknown_rule="threshold"``, or no held-out support examples)."""
        adapted = self.adapted
        if adapted is not None and adapted.has_heldout and settings.unknown_rule == "adaptive":
            return adapted, adapted.min_prob(), float(settings.miss_rate)
        return None, float(settings.unknown_threshold), 0.0

    def predict_range(self, store: _QueryStore, preds: list[Prediction | None],
                      predictor: Predictor | None, start: int, stop: int,
                      names: Sequence[str], corrections: Mapping[Path, str],
                      settings: LabelSettings) -> None:
        """Recompute ``preds[start:stop]`` for the processed queries of ``store``.
        ``predictor=None``: reuse the stored top-k and typicality (a new threshold or miss
        rate needs no head). ``corrections``: the user's labels (path -> class name).
        Unknown (:func:`is_unknown`): with ``unknown_rule="adaptive"`` and held-out support
        examples, a top probability below :meth:`Adapted.min_prob` or a typicality p-value
        <= ``miss_rate``; else a top probability below ``unknown_threshold``.
        The cyclic GC is paused meanwhile: tens of thousands of new acyclic objects would
        otherwise trigger full collections over everything alive (tens of ms)."""
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            rule = self._rule(settings)
            index = store.index
            corr = {index[p]: lab for p, lab in corrections.items() if p in index}
            k = min(3, len(names))
            scorer = None
            if predictor is not None:
                adapted = rule[0]
                also = (adapted.prototypes if adapted is not None and adapted.kind == "head"
                        else None)
                scorer = self.scorer(predictor, also, top=adapted is not None)
            chunk = (self._chunk(scorer, store.feature_shape, len(names))
                     if scorer is not None else _HEAD_CHUNK)
            if store.top_p is None or store.top_p.shape[1] != k:
                store.top_p = np.zeros((store.n, k), np.float32)
                store.top_i = np.zeros((store.n, k), np.int64)
                store.typical = np.ones(store.n, np.float32)
            names_arr = np.array(names, dtype=object)
            for c0 in range(start, stop, chunk):
                c1 = min(stop, c0 + chunk)
                tops, unknown = self._score_chunk(store, scorer, rule, k, names_arr, c0, c1)
                _fill(store, preds, c0, c1, tops, unknown, corr, k)
        finally:
            if was_enabled:
                gc.enable()

    def _score_chunk(self, store: _QueryStore, scorer: Scorer | None,
                     rule: tuple[Adapted | None, float, float], k: int,
                     names_arr: np.ndarray, c0: int, c1: int
                     ) -> tuple[list[tuple[tuple[str, float], ...]], list[bool]]:
        """Rows ``[c0, c1)``: score them (``scorer`` None: keep the stored top-k) and return
        each row's top-k ``(name, probability)`` pairs and unknown flag (empty lists when no
        row is valid)."""
        if not store.valid[c0:c1].any():
            return [], []
        assert store.top_p is not None and store.top_i is not None
        assert store.typical is not None
        adapted, min_prob, miss_rate = rule
        if scorer is not None:
            with torch.no_grad(), self._threads():
                probs, top = scorer(store.block(c0, c1))
                top_p, top_i = probs.topk(k, dim=1)
                if adapted is not None and top is not None:
                    store.typical[c0:c1] = adapted.typicality(top).numpy()
            store.top_p[c0:c1], store.top_i[c0:c1] = top_p.numpy(), top_i.numpy()
        unknown = is_unknown(store.top_p[c0:c1, 0], store.typical[c0:c1], min_prob,
                             miss_rate).tolist()
        # numpy's tolist is faster than torch's; top-k pairs built by zip, column by column
        top_i, top_p = store.top_i[c0:c1], store.top_p[c0:c1]
        tops = list(zip(*[zip(names_arr[top_i[:, r]].tolist(), top_p[:, r].tolist(),
                              strict=True) for r in range(k)], strict=True))
        return tops, unknown


def _fill(store: _QueryStore, preds: list[Prediction | None], c0: int, c1: int,
          tops: list[tuple[tuple[str, float], ...]], unknown: list[bool],
          corr: dict[int, str], k: int) -> None:
    """Write the Predictions of the processed rows ``[c0, c1)``: corrected (the user's
    label), error, unknown or ok."""
    ok_, unknown_, error_ = Status.OK, Status.UNKNOWN, Status.ERROR
    if k > 1 and not corr and store.valid[c0:c1].all():  # the common case, in one go
        preds[c0:c1] = [
            Prediction(path, None, t[0][1], t[0][1] - t[1][1], unknown_, t) if u else
            Prediction(path, t[0][0], t[0][1], t[0][1] - t[1][1], ok_, t)
            for path, t, u in zip(store.paths[c0:c1], tops, unknown, strict=True)]
        return
    done = store.done[c0:c1].tolist()
    valid = store.valid[c0:c1].tolist()
    for j, (path, is_done, is_valid) in enumerate(zip(store.paths[c0:c1], done, valid,
                                                      strict=True)):
        if not is_done:
            continue
        i = c0 + j
        label = corr.get(i) if corr else None
        if not is_valid:
            reason = store.errors.get(i, "not processed")
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
