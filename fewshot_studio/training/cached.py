"""The trainer's cached-feature mode: meta-train the trainable tail of a model on features
its frozen trunk computed once (e.g. EfficientNet-Lite0's stem and blocks, where training
end to end is out of reach on a CPU), and evaluate on such features.

The step is the trainer's: Adam from :func:`~.steps.make_optimizer` (one parameter group per
learning rate), the cosine schedule of :func:`~.steps.lr_at`, :func:`~.steps.train_step`
(gradient-norm clipping included). Only the data differ: episodes index a tensor of features
instead of images, and BatchNorm statistics stay frozen (the trunk's pretraining's).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from fewshot_studio.data.sampler import EpisodeSampler
from fewshot_studio.models.base import FewShotClassifier
from fewshot_studio.progress import Progress
from fewshot_studio.training.config import TrainConfig
from fewshot_studio.training.distributed import MetaLossModule
from fewshot_studio.training.evaluate import EvalResult, confidence_interval, episode_accuracy
from fewshot_studio.training.steps import lr_at, make_optimizer, train_step

EMBED_BATCH = 256


def evaluate_features(model: FewShotClassifier, feats: Tensor, targets: Tensor, way: int,
                      shot: int, episodes: int, seed: int = 0, query: int = 15) -> EvalResult:
    """:func:`~.evaluate.evaluate` on cached trunk outputs ``feats`` ``(N, *trunk_shape)``
    (the model's backbone maps them to features) with ``(N,)`` ``targets``: the same sampler,
    seed and per-episode code as ``fewshot-studio eval``."""
    was = model.training
    model.eval()
    with torch.no_grad():
        emb = torch.cat([model.embed(feats[i:i + EMBED_BATCH].float())
                         for i in range(0, feats.shape[0], EMBED_BATCH)])
    eps = EpisodeSampler(targets, way, shot, query, seed=seed).episodes(episodes)
    needs = model.fit_needs_grad
    accs = [episode_accuracy(model, emb[e.support], e.support_labels, emb[e.query],
                             e.query_labels, way, needs) for e in eps]
    model.train(was)
    mean, ci = confidence_interval(accs)
    return EvalResult(mean, ci, len(accs), accs, way, shot, query, seed)


@dataclass(frozen=True)
class CachedTrainConfig:
    """A cached-feature training: ``way``-way episodes of ``query`` queries per class whose
    shots take ``shots`` in turn; ``steps`` optimiser steps, one learning rate per parameter
    group (``lrs``) on the trainer's cosine schedule down to ``min_lr_ratio`` of it;
    validation every ``val_every`` steps and at the last (the best is kept); gradient norm
    clipped to ``grad_clip``; stopped early after ``time_limit_s`` seconds."""

    way: int
    shots: tuple[int, ...]
    query: int
    steps: int
    lrs: tuple[float, ...]
    val_every: int = 100
    grad_clip: float = 5.0
    min_lr_ratio: float = 0.01
    time_limit_s: float | None = None

    def schedule(self, lr: float) -> TrainConfig:
        """The trainer's settings whose :func:`~.steps.lr_at` is this training's schedule
        for a group of base rate ``lr``."""
        return TrainConfig(lr=lr, schedule="cosine", warmup=0, episodes=self.steps,
                           min_lr_ratio=self.min_lr_ratio)


@dataclass
class CachedTrainResult:
    """The best validation score and its step, the steps run, the wall time, and one row per
    validation (``step``, ``loss``, ``acc``, ``val_acc``, ``elapsed_s``; step 0: before
    training)."""

    best: float
    best_step: int
    steps_run: int
    wall_s: float
    rows: list[dict[str, Any]] = field(default_factory=list)


def _freeze_bn_stats(model: nn.Module) -> None:
    """Training mode, except BatchNorm layers: their statistics stay; their affine trains."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()


def train_on_features(model: FewShotClassifier, groups: Sequence[Sequence[nn.Parameter]],
                      feats: Tensor, targets: Tensor, config: CachedTrainConfig,
                      validate: Callable[[], float]) -> Iterator[Progress]:
    """Meta-train ``model`` (its backbone takes cached trunk outputs) on episodes of
    ``feats`` ``(N, *trunk_shape)`` / ``targets`` ``(N,)``, the parameters in ``groups``
    at ``config.lrs``. ``validate()`` scores the model (higher is better; it may switch the
    model to eval mode). Yields a :class:`Progress` after step 0 (before training) and after
    each validation; the last carries a :class:`CachedTrainResult`, and the model then holds
    the best validated weights."""
    opt = make_optimizer([{"params": list(g), "lr": lr}
                          for g, lr in zip(groups, config.lrs, strict=True)], config.lrs[0])
    schedules = [config.schedule(lr) for lr in config.lrs]
    samplers = [EpisodeSampler(targets, config.way, k, config.query, seed=k)
                for k in config.shots]
    step_module = MetaLossModule(model)
    best, best_step = validate(), 0
    best_state = {k: v.clone() for k, v in model.state_dict().items()}
    rows: list[dict[str, Any]] = [{"step": 0, "val_acc": best}]
    yield Progress(0, config.steps, metrics={"val_acc": best})
    t0 = time.time()
    step = 0
    for step in range(1, config.steps + 1):
        for g, schedule in zip(opt.param_groups, schedules, strict=True):
            g["lr"] = lr_at(schedule, step)
        _freeze_bn_stats(model)
        ep = samplers[step % len(samplers)].sample()
        batch = (feats[ep.support].float()[None], ep.support_labels[None],
                 feats[ep.query].float()[None], ep.query_labels[None])
        loss, acc = train_step(step_module, opt, batch, grad_clip=config.grad_clip)
        if step % config.val_every == 0 or step == config.steps:
            v = validate()
            rows.append({"step": step, "loss": loss.item(), "acc": acc.item(), "val_acc": v,
                         "elapsed_s": round(time.time() - t0, 1)})
            if v > best:
                best, best_step = v, step
                best_state = {k: t.clone() for k, t in model.state_dict().items()}
            yield Progress(step, config.steps, metrics={"loss": loss.item(), "val_acc": v,
                                                        "elapsed_s": time.time() - t0})
        if config.time_limit_s and time.time() - t0 > config.time_limit_s:
            break
    wall = time.time() - t0
    model.load_state_dict(best_state)
    yield Progress(step, config.steps, message="done", metrics={"val_acc": best},
                   payload=CachedTrainResult(best, best_step, step, wall, rows))
