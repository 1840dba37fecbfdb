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
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fewshot_studio.data.preprocess import Preprocess
from fewshot_studio.data.sampler import Episode, EpisodeSampler
from fewshot_studio.data.splits import alphabet_of, drawer_of
from fewshot_studio.data.tta import embed_tta, tta_kind
from fewshot_studio.errors import UserError
from fewshot_studio.models import finetune as ft
from fewshot_studio.models.base import FewShotClassifier
from fewshot_studio.progress import Progress, ProgressBar, run_with_bar

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
    # within-alphabet protocol: the alphabets the episodes were drawn from (empty: random
    # classes), and whether support and query drawers were kept apart
    alphabets: tuple[str, ...] = ()
    drawers: bool = False
    # fraction of all queries whose calibrated top probability is below unknown_threshold
    # (what `label` would mark unknown; None: not measured)
    unknown_threshold: float | None = None
    unknown: float | None = None
    # test-time fine-tuning on each episode's support set (models/finetune.py): its settings
    finetune: dict[str, Any] | None = None

    def __str__(self) -> str:
        how = f", transductive x{self.transductive}" if self.transductive else ""
        how += ", fine-tuned on each support set" if self.finetune is not None else ""
        how += f", TTA x{self.tta}" if self.tta else ""
        if self.alphabets:
            how += (f", within one alphabet ({len(self.alphabets)} alphabets)"
                    + (", support and query by different drawers" if self.drawers else ""))
        text = (f"accuracy: {100 * self.accuracy:.2f}% +- {100 * self.ci95:.2f}% "
                f"(95% CI, {self.n} episodes{how})")
        if self.unknown is not None:
            text += (f"\nunknown at threshold {self.unknown_threshold:g}: "
                     f"{100 * self.unknown:.2f}% of the queries")
        return text

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalResult:
        """The summary :meth:`to_dict` stored: accuracy, CI, episodes and the protocol's way,
        shot, query and seed (no per-episode accuracies, no within-alphabet details)."""
        return cls(d["accuracy"], d["ci95"], d["episodes"], [], d["way"], d["shot"],
                   d["query"], d["seed"])

    def to_dict(self) -> dict[str, Any]:
        """The summary stored in a checkpoint's evaluation metadata (no per-episode list)."""
        out = {"accuracy": self.accuracy, "ci95": self.ci95, "episodes": self.n,
               "way": self.way, "shot": self.shot, "query": self.query, "seed": self.seed}
        if self.transductive:
            out["transductive"] = self.transductive
        if self.tta:
            out["tta"] = self.tta
        if self.alphabets:
            out["protocol"] = "within-alphabet"
            out["alphabets"] = len(self.alphabets)
            out["different_drawers"] = self.drawers
        if self.unknown is not None:
            out["unknown_threshold"] = self.unknown_threshold
            out["unknown"] = self.unknown
        if self.finetune is not None:
            out["adapt"] = "finetune"
            out["finetune"] = self.finetune
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


def episode_logits(model: FewShotClassifier, support_feats: Tensor, support_labels: Tensor,
                   query_feats: Tensor, n_way: int, needs_grad: bool,
                   transductive: int = 0) -> Tensor:
    """Fit on ``(n_s, *f)`` support features -> detached ``(n_q, n_way)`` logits of the
    ``(n_q, *f)`` queries. ``transductive``: refine the predictor over the episode's queries
    with that many soft k-means iterations first (what the app's "Transductive refinement"
    does; methods whose predictor has ``refine``, see ``FewShotClassifier.supports_refinement``)."""
    with torch.enable_grad() if needs_grad else torch.no_grad():
        predictor = model.fit(support_feats, support_labels, n_way)
        if transductive:
            predictor = predictor.refine(query_feats, n_iters=transductive)  # type: ignore[attr-defined]
        return predictor(query_feats).detach()


def episode_accuracy(model: FewShotClassifier, support_feats: Tensor, support_labels: Tensor,
                     query_feats: Tensor, query_labels: Tensor, n_way: int,
                     needs_grad: bool, transductive: int = 0) -> float:
    """Fit on ``(n_s, *f)`` support features and score ``(n_q, *f)`` queries -> accuracy
    (:func:`episode_logits`)."""
    logits = episode_logits(model, support_feats, support_labels, query_feats, n_way,
                            needs_grad, transductive)
    return float((logits.argmax(-1) == query_labels).float().mean().item())


def top_probability(model: FewShotClassifier, logits: Tensor, temperature: float = 1.0
                    ) -> Tensor:
    """``(n, n_way)`` logits -> ``(n,)`` top-1 probability as the labeling engine computes it:
    the model's declared ``probabilities`` of ``logits / temperature``."""
    return model.probabilities(logits, temperature).max(-1).values


def within_alphabet_args(images: Any) -> dict[str, Any]:
    """The :class:`EpisodeSampler` arguments of within-alphabet episodes over ``images``:
    ``groups`` (each class's alphabet: the first folder level of its name) and ``drawers``
    (each image's ``_NN`` file-name suffix; None when some file has none: then support and
    query differ by image only). :class:`UserError` for flat class names."""
    names = list(getattr(images, "class_names", []) or [])
    groups = [alphabet_of(n) for n in names]
    flat = [n for n, g in zip(names, groups, strict=True) if g is None]
    if not names or flat:
        raise UserError("within-alphabet episodes need nested class folders "
                        "(<alphabet>/<character>/<image>), but "
                        + (f"class {flat[0]!r} is not nested" if flat else "there are no classes"))
    files = list(getattr(images, "files", []) or [])
    found = [drawer_of(f) for f in files]
    drawers = (None if not files or any(d is None for d in found)
               else np.asarray(found, dtype=np.int64))
    return {"groups": groups, "drawers": drawers}


def fixed_episodes(images: Any, way: int, shot: int, query: int | None, episodes: int,
                   seed: int, within_alphabet: bool = False) -> tuple[list[Episode], int]:
    """The fixed episodes of ``images`` for a seed, and the number of queries per class used
    (``query``, or :func:`default_query` for the smallest class when None).
    ``within_alphabet``: every episode's classes from one alphabet, support and query by
    different drawers (:func:`within_alphabet_args`; with drawers, the default query is
    what the drawers left after the shots allow)."""
    return fixed_episode_sampler(images, way, shot, query, episodes, seed, within_alphabet)[:2]


def fixed_episode_sampler(images: Any, way: int, shot: int, query: int | None, episodes: int,
                          seed: int, within_alphabet: bool = False
                          ) -> tuple[list[Episode], int, EpisodeSampler]:
    """:func:`fixed_episodes` plus the sampler that drew them (its ``groups_used`` /
    ``groups_skipped`` name the alphabets of a within-alphabet protocol)."""
    targets = images.targets.cpu()
    names = list(getattr(images, "class_names", []) or [])
    extra = within_alphabet_args(images) if within_alphabet else {}
    if query is None:
        counts = torch.bincount(targets)
        smallest = int(counts[counts > 0].min().item())
        if extra.get("drawers") is not None:
            smallest = min(smallest, int(np.unique(extra["drawers"]).size))
        query = default_query(shot, smallest)
    sampler = EpisodeSampler(targets, way, shot, query, seed=seed, class_names=names or None,
                             **extra)
    return sampler.episodes(episodes), query, sampler


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


def finetuned_episode_features(model: FewShotClassifier, images: Any, eps: list[Episode],
                               preprocess: Preprocess, device: torch.device, tta: int,
                               settings: ft.FinetuneSettings
                               ) -> Iterator[tuple[Episode, Tensor, Tensor]]:
    """Like :func:`episode_features`, each episode embedded by a copy of ``model``
    fine-tuned on its support images (:func:`~fewshot_studio.models.finetune.finetune`,
    the checkpoint's own augmentation); ``model`` itself is never changed."""
    data: Tensor = images.images
    augment = ft.augment_for(preprocess, settings.strength)
    for ep in eps:
        support = data[ep.support.to(data.device)]
        adapted: FewShotClassifier | None = None
        for p in ft.finetune(model, _normalize(support.to(device), preprocess),
                             ep.support_labels.to(device), augment, settings,
                             n_way=int(ep.support_labels.max()) + 1):
            adapted = p.payload if p.payload is not None else adapted
        assert adapted is not None
        yield (ep, embed_images(adapted, support, preprocess, device, tta),
               embed_images(adapted, data[ep.query.to(data.device)], preprocess, device, tta))


def evaluate_iter(model: FewShotClassifier, images: Any, preprocess: Preprocess, way: int,
                  shot: int, query: int | None, episodes: int, seed: int = 0,
                  device: str | torch.device = "cpu", transductive: int = 0, tta: int = 0,
                  within_alphabet: bool = False, unknown_threshold: float | None = None,
                  temperature: float = 1.0, finetune: ft.FinetuneSettings | None = None
                  ) -> Iterator[Progress]:
    """Like :func:`evaluate`, as a generator of :class:`Progress`; the last one's
    ``payload`` is the :class:`EvalResult`. ``finetune``: fine-tune a copy of the model on
    each episode's support set with these settings first (``eval --adapt finetune``;
    seconds an episode, so progress comes every episode)."""
    if transductive and not model.supports_refinement:
        raise ValueError(f"{model.method_name} has no transductive refinement")
    device = torch.device(device)
    eps, query, sampler = fixed_episode_sampler(images, way, shot, query, episodes, seed,
                                                within_alphabet)
    was_training = model.training
    model.eval()
    needs_grad = model.fit_needs_grad
    accs: list[float] = []
    n_unknown = n_scored = 0
    try:
        feats = (episode_features(model, images, eps, preprocess, device, tta)
                 if finetune is None else finetuned_episode_features(
                     model, images, eps, preprocess, device, tta, finetune))
        for i, (ep, s_feat, q_feat) in enumerate(feats):
            logits = episode_logits(model, s_feat, ep.support_labels.to(device), q_feat, way,
                                    needs_grad, transductive)
            accs.append(float((logits.argmax(-1) == ep.query_labels.to(device))
                              .float().mean().item()))
            if unknown_threshold is not None:
                top = top_probability(model, logits, temperature)
                n_unknown += int((top < unknown_threshold).sum().item())
                n_scored += int(top.numel())
            if (i + 1) % 10 == 0 or i + 1 == len(eps) or finetune is not None:
                mean, _ = confidence_interval(accs)
                yield Progress(i + 1, len(eps), metrics={"acc": mean})
    finally:
        model.train(was_training)
    mean, ci = confidence_interval(accs)
    result = EvalResult(
        mean, ci, len(accs), accs, way, shot, query, seed, transductive, tta,
        alphabets=tuple(str(g) for g in sampler.groups_used) if within_alphabet else (),
        drawers=within_alphabet and sampler.by_drawers,
        unknown_threshold=unknown_threshold,
        unknown=n_unknown / max(1, n_scored) if unknown_threshold is not None else None,
        finetune=None if finetune is None else asdict(finetune))
    yield Progress(len(eps), len(eps), message=str(result), metrics={"acc": mean},
                   payload=result)


def evaluate(model: FewShotClassifier, images: Any, preprocess: Preprocess, way: int,
             shot: int, query: int | None, episodes: int, seed: int = 0,
             device: str | torch.device = "cpu", transductive: int = 0,
             tta: int = 0, within_alphabet: bool = False,
             unknown_threshold: float | None = None, temperature: float = 1.0,
             finetune: ft.FinetuneSettings | None = None) -> EvalResult:
    """Mean accuracy of ``model`` over ``episodes`` fixed ``way``-way ``shot``-shot episodes
    drawn with ``seed`` from ``images`` (an :class:`~fewshot_studio.data.datasets.
    InMemoryImages`: uint8 ``(N, C, H, W)`` images + ``(N,)`` targets), ``query`` queries per
    class (None: :func:`default_query`). Deterministic for a seed. ``transductive``: soft
    k-means iterations over each episode's queries before scoring them (0: none). ``tta``:
    every image's features averaged over that many test-time views (0 or 1: none).
    ``within_alphabet``: Lake et al.'s harder protocol, every episode's classes from one
    alphabet, support and query by different drawers (:func:`within_alphabet_args`).
    ``unknown_threshold``: also measure the fraction of queries whose top probability (of
    ``logits / temperature``) is below it, i.e. what ``label`` would mark unknown.
    ``finetune``: fine-tune a copy of the model on each episode's support set first."""
    result: EvalResult | None = None
    for p in evaluate_iter(model, images, preprocess, way, shot, query, episodes, seed, device,
                           transductive, tta, within_alphabet, unknown_threshold, temperature,
                           finetune):
        if isinstance(p.payload, EvalResult):
            result = p.payload
    assert result is not None
    return result


def evaluate_with_bar(model: FewShotClassifier, images: Any, preprocess: Preprocess, way: int,
                      shot: int, query: int | None, episodes: int, seed: int,
                      device: str | torch.device, label: str = "eval", transductive: int = 0,
                      tta: int = 0, within_alphabet: bool = False,
                      unknown_threshold: float | None = None,
                      temperature: float = 1.0,
                      finetune: ft.FinetuneSettings | None = None) -> EvalResult:
    """:func:`evaluate_iter` behind a terminal progress bar named ``label``; returns its
    :class:`EvalResult`."""
    return run_with_bar(
        evaluate_iter(model, images, preprocess, way, shot, query, episodes, seed, device,
                      transductive, tta, within_alphabet, unknown_threshold, temperature,
                      finetune),
        ProgressBar(label, unit="ep"), EvalResult)
