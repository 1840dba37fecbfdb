"""Episodic evaluation: mean accuracy over fixed N-way K-shot episodes with a 95% confidence
interval (``1.96 * std / sqrt(n)``), deterministic for a seed.

The method contract makes this fast: ``embed()`` does not depend on the support set, so every
image the episodes use is embedded once (in eval mode) and each episode only runs
``fit()`` + the predictor on cached features. MAML's ``fit()`` runs its inner loop, so it is
called with gradients enabled.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fewshot_studio.data.preprocess import Preprocess
from fewshot_studio.data.sampler import Episode, EpisodeSampler
from fewshot_studio.data.tta import embed_tta, tta_kind
from fewshot_studio.models.base import FewShotClassifier
from fewshot_studio.progress import Progress

# Embed every image the episodes use up front when the features fit in this many bytes;
# otherwise embed per episode.
FEATURE_CACHE_BYTES = 1 << 30


@dataclass(frozen=True)
class EvalResult:
    """Mean episode accuracy (fraction in [0, 1]) and its 95% CI half-width
    (``1.96 * std / sqrt(n)``, population std over episodes), ``n`` episodes, and every
    episode's accuracy."""

    accuracy: float
    ci95: float
    n: int
    per_episode: list[float] = field(default_factory=list)
    way: int = 0
    shot: int = 0
    query: int = 0
    seed: int = 0
    transductive: int = 0  # soft k-means iterations over each episode's queries (0: none)
    tta: int = 0  # test-time augmentation: views averaged per image (0: none)

    def __str__(self) -> str:
        how = f", transductive x{self.transductive}" if self.transductive else ""
        how += f", TTA x{self.tta}" if self.tta else ""
        return (f"accuracy: {100 * self.accuracy:.2f}% +- {100 * self.ci95:.2f}% "
                f"(95% CI, {self.n} episodes{how})")

    def to_dict(self) -> dict[str, Any]:
        """The summary stored in a checkpoint's evaluation metadata (no per-episode list)."""
        out = {"accuracy": self.accuracy, "ci95": self.ci95, "episodes": self.n,
               "way": self.way, "shot": self.shot, "query": self.query, "seed": self.seed}
        if self.transductive:
            out["transductive"] = self.transductive
        if self.tta:
            out["tta"] = self.tta
        return out


def confidence_interval(accuracies: Sequence[float]) -> tuple[float, float]:
    """``(mean, 1.96 * std / sqrt(n))`` of per-episode accuracies (std with ``ddof=0``)."""
    a = np.asarray(accuracies, dtype=np.float64)
    if a.size == 0:
        return float("nan"), float("nan")
    return float(a.mean()), float(1.96 * a.std() / math.sqrt(a.size))


def default_query(shot: int, min_images_per_class: int, cap: int = 15) -> int:
    """Queries per class for evaluation: ``cap`` (15), or what the smallest class has left
    after the shots (Omniglot's 20 drawings: 15 for K <= 5, ``20 - K`` beyond)."""
    return max(1, min(cap, min_images_per_class - shot))


def fit_needs_grad(model: FewShotClassifier) -> bool:
    """Whether ``fit()`` differentiates (MAML's inner loop). Methods say so with a
    ``fit_needs_grad`` attribute; by default gradients are enabled only when some parameter
    outside the backbone requires them and the method is not known to be closed-form."""
    flag = getattr(model, "fit_needs_grad", None)
    if flag is not None:
        return bool(flag)
    return model.method_name == "maml"


def _normalize(x_uint8: Tensor, pre: Preprocess) -> Tensor:
    """``(B, C, H, W)`` uint8 -> float normalised by ``pre.mean``/``pre.std``."""
    x = x_uint8.float().div_(255.0)
    c = x.shape[1]
    mean = torch.tensor(pre.mean, dtype=x.dtype, device=x.device)
    std = torch.tensor(pre.std, dtype=x.dtype, device=x.device)
    if mean.numel() == 1 and c > 1:
        mean, std = mean.expand(c), std.expand(c)
    return (x - mean.view(1, c, 1, 1)) / std.view(1, c, 1, 1)


@torch.no_grad()
def embed_images(model: FewShotClassifier, images: Tensor, pre: Preprocess,
                 device: torch.device, tta: int = 0) -> Tensor:
    """``(B, C, H, W)`` uint8 images -> ``(B, *feature_shape)`` features on ``device``,
    averaged over ``tta`` test-time views when ``tta`` > 1 (:mod:`fewshot_studio.data.tta`)."""
    x = _normalize(images.to(device, non_blocking=True), pre)
    return embed_tta(model.embed, x, tta, tta_kind(pre))


def embed_all(model: FewShotClassifier, images: Tensor, pre: Preprocess,
              device: torch.device, batch_size: int = 256, tta: int = 0) -> Tensor:
    """``(N, C, H, W)`` uint8 images -> ``(N, *feature_shape)`` features on ``device``
    (:func:`embed_images` by batches)."""
    return torch.cat([embed_images(model, images[i:i + batch_size], pre, device, tta)
                      for i in range(0, images.shape[0], batch_size)])


def episode_accuracy(model: FewShotClassifier, support_feats: Tensor, support_labels: Tensor,
                     query_feats: Tensor, query_labels: Tensor, n_way: int,
                     needs_grad: bool, transductive: int = 0) -> float:
    """Fit on ``(n_s, *f)`` support features and score ``(n_q, *f)`` queries -> accuracy.
    ``transductive``: refine the predictor over the episode's queries with that many soft
    k-means iterations first (what the app's "Transductive refinement" does; methods whose
    predictor has ``refine``, see ``FewShotClassifier.can_refine``)."""
    with torch.enable_grad() if needs_grad else torch.no_grad():
        predictor = model.fit(support_feats, support_labels, n_way)
        if transductive:
            predictor = predictor.refine(query_feats, n_iters=transductive)  # type: ignore[attr-defined]
        logits = predictor(query_feats)
    return float((logits.detach().argmax(-1) == query_labels).float().mean().item())


def fixed_episodes(images: Any, way: int, shot: int, query: int | None, episodes: int,
                   seed: int) -> tuple[list[Episode], int]:
    """The fixed episodes of ``images`` for a seed, and the number of queries per class used
    (``query``, or :func:`default_query` for the smallest class when None)."""
    targets = images.targets.cpu()
    names = list(getattr(images, "class_names", []) or [])
    if query is None:
        counts = torch.bincount(targets)
        query = default_query(shot, int(counts[counts > 0].min().item()))
    sampler = EpisodeSampler(targets, way, shot, query, seed=seed, class_names=names or None)
    return sampler.episodes(episodes), query


def episode_features(model: FewShotClassifier, images: Any, eps: list[Episode],
                     preprocess: Preprocess, device: torch.device, tta: int = 0
                     ) -> Iterator[tuple[Episode, Tensor, Tensor]]:
    """Yield ``(episode, support features (n_s, *f), query features (n_q, *f))`` for each
    episode. Each image is embedded once: all used images up front when their features fit
    in ``FEATURE_CACHE_BYTES``, else once per episode. ``tta``: see :func:`embed_images`."""
    data: Tensor = images.images
    used = torch.unique(torch.cat([torch.cat([e.support, e.query]) for e in eps]))
    probe = embed_images(model, data[used[:2]], preprocess, device)  # feature size
    cached: Tensor | None = None
    position: Tensor | None = None
    if probe[0].numel() * probe.element_size() * used.numel() <= FEATURE_CACHE_BYTES:
        cached = embed_all(model, data[used.to(data.device)], preprocess, device, tta=tta)
        position = torch.full((int(images.targets.numel()),), -1, dtype=torch.long)
        position[used] = torch.arange(used.numel())
    for ep in eps:
        if cached is not None and position is not None:
            yield ep, cached[position[ep.support].to(device)], cached[position[ep.query].to(device)]
            continue
        idx = torch.cat([ep.support, ep.query]).to(data.device)
        feats = embed_images(model, data[idx], preprocess, device, tta)
        yield ep, feats[: ep.support.numel()], feats[ep.support.numel():]


def evaluate_iter(model: FewShotClassifier, images: Any, preprocess: Preprocess, way: int,
                  shot: int, query: int | None, episodes: int, seed: int = 0,
                  device: str | torch.device = "cpu", transductive: int = 0, tta: int = 0
                  ) -> Iterator[Progress]:
    """Like :func:`evaluate`, as a generator of :class:`Progress`; the last one's
    ``payload`` is the :class:`EvalResult`."""
    if transductive and not model.can_refine:
        raise ValueError(f"{model.method_name} has no transductive refinement")
    device = torch.device(device)
    eps, query = fixed_episodes(images, way, shot, query, episodes, seed)
    was_training = model.training
    model.eval()
    needs_grad = fit_needs_grad(model)
    accs: list[float] = []
    try:
        for i, (ep, s_feat, q_feat) in enumerate(
                episode_features(model, images, eps, preprocess, device, tta)):
            accs.append(episode_accuracy(model, s_feat, ep.support_labels.to(device), q_feat,
                                         ep.query_labels.to(device), way, needs_grad,
                                         transductive))
            if (i + 1) % 10 == 0 or i + 1 == len(eps):
                mean, _ = confidence_interval(accs)
                yield Progress(i + 1, len(eps), metrics={"acc": mean})
    finally:
        model.train(was_training)
    mean, ci = confidence_interval(accs)
    result = EvalResult(mean, ci, len(accs), accs, way, shot, query, seed, transductive, tta)
    yield Progress(len(eps), len(eps), message=str(result), metrics={"acc": mean},
                   payload=result)


def evaluate(model: FewShotClassifier, images: Any, preprocess: Preprocess, way: int,
             shot: int, query: int | None, episodes: int, seed: int = 0,
             device: str | torch.device = "cpu", transductive: int = 0,
             tta: int = 0) -> EvalResult:
    """Mean accuracy of ``model`` over ``episodes`` fixed ``way``-way ``shot``-shot episodes
    drawn with ``seed`` from ``images`` (an :class:`~fewshot_studio.data.datasets.
    InMemoryImages`: uint8 ``(N, C, H, W)`` images + ``(N,)`` targets), ``query`` queries per
    class (None: :func:`default_query`). Deterministic for a seed. ``transductive``: soft
    k-means iterations over each episode's queries before scoring them (0: none). ``tta``:
    every image's features averaged over that many test-time views (0 or 1: none)."""
    result: EvalResult | None = None
    for p in evaluate_iter(model, images, preprocess, way, shot, query, episodes, seed, device,
                           transductive, tta):
        if isinstance(p.payload, EvalResult):
            result = p.payload
    assert result is not None
    return result
