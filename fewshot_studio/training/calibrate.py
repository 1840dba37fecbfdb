"""Post-hoc temperature scaling (Guo et al. 2017) of a few-shot model's confidences.

A single scalar ``T > 0`` divides every logit before the softmax: ``p = softmax(z / T)``.
``T`` is fitted to minimise the negative log-likelihood of the query labels over fixed
episodes drawn from held-out (validation) classes. Dividing by a positive constant never
changes the argmax, so accuracy is unchanged; only the confidences move (``T > 1``: a model
that was overconfident becomes less sure).

The fitted temperature lives in a checkpoint's evaluation metadata under
:data:`fewshot_studio.io.checkpoint.CALIBRATION_KEY` (``{"temperature": T, "data": ...,
"way": ..., ...}``, :meth:`CalibrationResult.to_metadata`); old checkpoints lack it and mean
``T = 1`` (:attr:`fewshot_studio.io.checkpoint.Checkpoint.temperature`). The labeling engine
applies it wherever it computes probabilities.

Pure torch, no Qt.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fewshot_studio.data.preprocess import Preprocess
from fewshot_studio.models.base import FewShotClassifier
from fewshot_studio.progress import Progress
from fewshot_studio.training.evaluate import episode_features, fixed_episodes

ECE_BINS = 15
_LOG_T_RANGE = (-6.0, 6.0)  # search interval of log T: T in [0.0025, 403]


@dataclass(frozen=True)
class CalibrationResult:
    """A fitted temperature and what it did on the episodes it was fitted on.

    ``nll_*``: mean negative log-likelihood of the query labels; ``ece_*``: 15-bin expected
    calibration error of the top-1 confidence, before (``T = 1``) and after (``T``);
    ``accuracy``: top-1 accuracy (the same for any ``T``); ``n_queries``: scored queries."""

    temperature: float
    nll_before: float
    nll_after: float
    ece_before: float
    ece_after: float
    accuracy: float
    n_queries: int = 0
    way: int = 0
    shot: int = 0
    query: int = 0
    episodes: int = 0
    seed: int = 0

    def __str__(self) -> str:
        return (f"temperature: {self.temperature:.4f}\n"
                f"NLL: {self.nll_before:.4f} -> {self.nll_after:.4f}\n"
                f"ECE ({ECE_BINS} bins): {100 * self.ece_before:.2f}% -> "
                f"{100 * self.ece_after:.2f}%\n"
                f"accuracy: {100 * self.accuracy:.2f}% ({self.n_queries} queries, "
                f"{self.episodes} episodes {self.way}w{self.shot}s, seed {self.seed})")

    def to_metadata(self, **extra: Any) -> dict[str, Any]:
        """The record stored under ``Checkpoint.evaluation["calibration"]`` (plus ``extra``,
        e.g. ``data`` and ``classes``)."""
        return {**asdict(self), **extra}


def expected_calibration_error(probs: Tensor, labels: Tensor, n_bins: int = ECE_BINS) -> float:
    """ECE of ``(n, k)`` probabilities against ``(n,)`` integer labels: queries binned by
    top-1 confidence into ``n_bins`` equal-width bins over ``(0, 1]``;
    ``sum_b |B_b|/n * |acc(B_b) - conf(B_b)|``."""
    conf, pred = probs.float().max(-1)
    correct = (pred == labels).float()
    # bin b holds conf in (b/n, (b+1)/n]; conf is > 0 after a softmax
    bins = (conf * n_bins).ceil().long().clamp(1, n_bins) - 1
    n = conf.numel()
    if n == 0:
        return float("nan")
    conf_sum = torch.bincount(bins, weights=conf, minlength=n_bins)
    acc_sum = torch.bincount(bins, weights=correct, minlength=n_bins)
    return float((conf_sum - acc_sum).abs().sum() / n)


def nll(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``(n,)`` labels under ``softmax((n, k) logits / T)``."""
    return float(F.cross_entropy(logits.double() / temperature, labels))


def fit_temperature_to_logits(logits: Tensor, labels: Tensor, iters: int = 60) -> float:
    """The ``T > 0`` minimising ``nll(logits, labels, T)`` for ``(n, k)`` logits and
    ``(n,)`` labels.

    The NLL is convex in ``1/T`` (log-sum-exp of a linear function minus a linear term), so
    it is unimodal in ``log T``: a coarse grid over ``log T`` in [-6, 6] brackets the
    minimum, then golden-section search refines it (to ~1e-9 in ``log T``). Deterministic."""
    z = logits.detach().double().cpu()
    y = labels.detach().cpu().long()

    def f(log_t: float) -> float:
        return float(F.cross_entropy(z * math.exp(-log_t), y))

    lo, hi = _LOG_T_RANGE
    grid = [lo + (hi - lo) * i / 48 for i in range(49)]
    vals = [f(g) for g in grid]
    best = min(range(len(grid)), key=vals.__getitem__)
    a, b = grid[max(0, best - 1)], grid[min(len(grid) - 1, best + 1)]
    phi = (math.sqrt(5.0) - 1.0) / 2.0
    c, d = b - phi * (b - a), a + phi * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(iters):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - phi * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + phi * (b - a)
            fd = f(d)
    return math.exp((a + b) / 2.0)


def collect_logits_iter(model: FewShotClassifier, images: Any, preprocess: Preprocess,
                        way: int, shot: int, query: int | None, episodes: int, seed: int = 0,
                        device: str | torch.device = "cpu") -> Iterator[Progress]:
    """Logits of every query over ``episodes`` fixed episodes (the same episodes as
    :func:`~fewshot_studio.training.evaluate.evaluate` for the same arguments), as a generator
    of :class:`Progress`; the last one's ``payload`` is ``(logits (E * way * query, way),
    labels (E * way * query,))`` on the CPU, float32 / int64. Each image is embedded once
    (all of them up front when the features fit in memory, else once per episode)."""
    device = torch.device(device)
    eps, query = fixed_episodes(images, way, shot, query, episodes, seed)
    was_training = model.training
    model.eval()
    needs_grad = model.fit_needs_grad
    all_logits: list[Tensor] = []
    all_labels: list[Tensor] = []
    try:
        for i, (ep, s_feat, q_feat) in enumerate(
                episode_features(model, images, eps, preprocess, device)):
            with torch.enable_grad() if needs_grad else torch.no_grad():
                predictor = model.fit(s_feat, ep.support_labels.to(device), way)
                logits = predictor(q_feat)
            all_logits.append(logits.detach().float().cpu())
            all_labels.append(ep.query_labels.cpu().long())
            if (i + 1) % 10 == 0 or i + 1 == len(eps):
                yield Progress(i + 1, len(eps))
    finally:
        model.train(was_training)
    yield Progress(len(eps), len(eps), payload=(torch.cat(all_logits), torch.cat(all_labels)))


def calibration_from_logits(logits: Tensor, labels: Tensor, temperature: float | None = None,
                            **info: int) -> CalibrationResult:
    """Fit ``T`` on ``(n, k)`` logits and ``(n,)`` labels (or take the given ``temperature``:
    to check a fitted one on other classes) and measure NLL / ECE before (``T = 1``) and
    after. ``info``: way, shot, query, episodes, seed (recorded as they are)."""
    t = fit_temperature_to_logits(logits, labels) if temperature is None else float(temperature)
    p0 = torch.softmax(logits.double(), -1)
    p1 = torch.softmax(logits.double() / t, -1)
    acc = float((logits.argmax(-1) == labels).float().mean()) if labels.numel() else float("nan")
    return CalibrationResult(
        temperature=t, nll_before=nll(logits, labels), nll_after=nll(logits, labels, t),
        ece_before=expected_calibration_error(p0, labels),
        ece_after=expected_calibration_error(p1, labels), accuracy=acc,
        n_queries=int(labels.numel()), **info)


def fit_temperature_iter(model: FewShotClassifier, images: Any, preprocess: Preprocess,
                         way: int, shot: int, query: int | None, episodes: int, seed: int = 0,
                         device: str | torch.device = "cpu",
                         temperature: float | None = None) -> Iterator[Progress]:
    """:func:`fit_temperature` as a generator of :class:`Progress`; the last one's
    ``payload`` is the :class:`CalibrationResult`. ``temperature``: measure this one instead
    of fitting (e.g. a temperature fitted on validation classes, on test classes)."""
    out: tuple[Tensor, Tensor] | None = None
    for p in collect_logits_iter(model, images, preprocess, way, shot, query, episodes, seed,
                                 device):
        if p.payload is not None:
            out = p.payload
        else:
            yield p
    assert out is not None
    logits, labels = out
    q = labels.numel() // max(1, episodes * way)
    result = calibration_from_logits(logits, labels, temperature, way=way, shot=shot, query=q,
                                     episodes=episodes, seed=seed)
    yield Progress(episodes, episodes, message=str(result), payload=result)


def fit_temperature(model: FewShotClassifier, images: Any, preprocess: Preprocess, way: int,
                    shot: int, query: int | None, episodes: int, seed: int = 0,
                    device: str | torch.device = "cpu") -> CalibrationResult:
    """Fit the temperature of ``model`` on ``episodes`` fixed ``way``-way ``shot``-shot
    episodes (``query`` queries per class; None: as :func:`~fewshot_studio.training.
    evaluate.default_query`) drawn with ``seed`` from ``images`` (uint8 ``(N, C, H, W)``
    images + ``(N,)`` targets, e.g. from ``load_eval_images`` on validation classes).
    Deterministic for a seed."""
    result: CalibrationResult | None = None
    for p in fit_temperature_iter(model, images, preprocess, way, shot, query, episodes, seed,
                                  device):
        if isinstance(p.payload, CalibrationResult):
            result = p.payload
    assert result is not None
    return result
