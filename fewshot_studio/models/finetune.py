"""Test-time fine-tuning on the support set (the "F" of P>M>F, Hu et al., CVPR 2022).

The last ``blocks`` units of the backbone (the "trainable suffix") are trained on
pseudo-episodes drawn from the support set with the method's own episodic loss (ProtoNet:
the prototypes' softmax cross-entropy): each step, the prototypes come from the support
images as they are and the queries are augmented views of the same images (the checkpoint's
own augmentation, :func:`augment_for`), so a 1-shot support set works too.

The frozen part (the "prefix") never changes, so every augmented view goes through it once:
``views`` augmented views of each support image are computed up front and each step only
runs the trainable suffix (a few percent of EfficientNet-Lite0's cost at 224 px; a timm
model, which has no general cut, runs whole and trains its last units). BatchNorm
keeps its running statistics (eval mode throughout); its affine weights train.

:func:`finetune` returns an adapted deep copy and never mutates the model it is given; it is
a generator of :class:`~fewshot_studio.progress.Progress` (the last one's ``payload`` is the
adapted model), so callers show an ETA and cancel by closing it.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fewshot_studio.data.preprocess import Preprocess
from fewshot_studio.errors import UserError
from fewshot_studio.models.backbones.conv4 import Conv4
from fewshot_studio.models.backbones.efficientnet_lite0 import EfficientNetLite0, lite0_readout
from fewshot_studio.models.backbones.resnet12 import ResNet12
from fewshot_studio.models.backbones.timm_model import TimmBackbone, trailing_units
from fewshot_studio.models.base import FewShotClassifier
from fewshot_studio.progress import Progress

Augment = Callable[[Tensor, torch.Generator], Tensor]
"""``(B, C, H, W)`` normalised images and a generator -> augmented images, same shape."""


@dataclass(frozen=True)
class FinetuneSettings:
    """How :func:`finetune` adapts a model (chosen on the dev sets with
    ``benchmarks/finetune.py``; never on test queries).

    ``steps``: optimiser steps (Adam, learning rate ``lr``). ``blocks``: trailing backbone
    units trained (EfficientNet-Lite0: 1 = its 1x1 head conv and the readout weight, 2 = also
    the last MBConv block, ...; Conv4 / ResNet-12: the last ``blocks`` blocks; a timm model:
    its last ``blocks`` units, :func:`~fewshot_studio.models.backbones.timm_model.
    trailing_units`). ``views``:
    augmented views of each support image computed through the frozen part up front.
    ``way``: classes per pseudo-episode (None or more than the support has: all).
    ``query``: images of a class held out as that class's queries in each pseudo-episode,
    where it has more (0: none; every image's clean view is in the support and an augmented
    view of it is a query, as in P>M>F). ``strength``: of the augmentation
    (:func:`augment_for`; 1: the training defaults; half of them measured better on CIFAR-10,
    whose upscaled 32 px images a full-strength crop blurs away, and as well on GTSRB).
    ``seed``: the augmentation's and the pseudo-episodes' random numbers."""

    steps: int = 40
    lr: float = 3e-4
    blocks: int = 2
    views: int = 4
    way: int | None = None
    query: int = 0
    strength: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.steps < 0 or self.views < 1 or self.blocks < 1 or self.lr < 0
                or self.query < 0 or self.strength < 0):
            raise UserError(f"fine-tuning settings out of range: {self}")
        if self.way is not None and self.way < 2:
            raise UserError("fine-tuning pseudo-episodes need at least 2 classes")

    def key(self) -> str:
        """A stable text naming these settings (part of a feature-cache key)."""
        return json.dumps(asdict(self), sort_keys=True)


@dataclass(frozen=True, eq=False)
class Split:
    """A backbone cut in two: ``prefix`` (frozen) maps ``(n, C, H, W)`` images to
    intermediate maps, ``suffix`` (trained) maps those to the backbone's output, so
    ``suffix(prefix(x)) == backbone(x)``. ``suffix`` shares its parameters with the
    backbone it was cut from. ``trained``: the suffix's parameters that train (None: all of
    them; a backbone that cannot be cut in general, a timm model, has the identity prefix
    and trains only its last units)."""

    prefix: Callable[[Tensor], Tensor]
    suffix: nn.Module
    trained: tuple[nn.Parameter, ...] | None = None

    def parameters(self) -> list[nn.Parameter]:
        """The floating-point parameters that train."""
        params = self.suffix.parameters() if self.trained is None else self.trained
        return [p for p in params if p.is_floating_point()]


class _Lite0Suffix(nn.Module):
    """The last MBConv blocks of an EfficientNet-Lite0 (maybe none) and its readout."""

    def __init__(self, backbone: EfficientNetLite0, start: int) -> None:
        super().__init__()
        self.blocks = backbone.blocks[start:]
        self.head = backbone.head
        self.block_weight = backbone.block_weight

    def forward(self, x: Tensor) -> Tensor:
        """``(n, c, h, w)`` maps of block ``start - 1`` -> the backbone's features."""
        return lite0_readout(self.head, self.blocks(x), self.block_weight)


def _split_lite0(bb: EfficientNetLite0, blocks: int) -> Split:
    start = max(0, len(bb.blocks) - (blocks - 1))
    return Split(lambda x: bb.blocks[:start](bb.stem(x)), _Lite0Suffix(bb, start))


def _split_sequential(seq: nn.Sequential, blocks: int) -> Split:
    start = max(0, len(seq) - blocks)
    return Split(seq[:start], seq[start:])


def _split_timm(bb: TimmBackbone, blocks: int) -> Split:
    """The whole model runs each step (a timm model has no general cut); only the parameters
    of its last ``blocks`` units (:func:`trailing_units`) train."""
    units = trailing_units(bb.model)[-blocks:]
    return Split(nn.Identity(), bb, tuple(p for _, u in units for p in u.parameters()))


# How each backbone is cut: a table, one entry per backbone class (a backbone not in it
# cannot be fine-tuned).
SPLITS: dict[type[nn.Module], Callable[[Any, int], Split]] = {
    EfficientNetLite0: _split_lite0,
    Conv4: lambda bb, b: _split_sequential(bb.encoder, b),
    ResNet12: lambda bb, b: _split_sequential(bb.blocks, b),
    TimmBackbone: _split_timm,
}


def can_finetune(model: FewShotClassifier) -> bool:
    """Whether :func:`finetune` applies: a backbone with an entry in :data:`SPLITS` and a
    method whose ``fit`` is a plain differentiable function of the features (not MAML)."""
    return (type(model.backbone) in SPLITS and not model.fit_needs_grad
            and not model.embed_is_identity)


def split_backbone(model: FewShotClassifier, blocks: int) -> Split:
    """``model.backbone`` cut before its last ``blocks`` units (:data:`SPLITS`);
    :class:`UserError` when the model cannot be fine-tuned (:func:`can_finetune`)."""
    if not can_finetune(model):
        raise UserError(f"fine-tuning does not apply to this {model.method_name} model "
                        f"({type(model.backbone).__name__} backbone)")
    return SPLITS[type(model.backbone)](model.backbone, blocks)


def augment_for(pre: Preprocess, strength: float = 1.0) -> Augment:
    """The checkpoint's own training augmentation on normalised images: the photo
    augmentation (random resized crop, flip, colour jitter) for RGB, the Omniglot warps
    (affine + stroke thickness) for grayscale. ``(B, C, H, W)`` -> same shape."""
    from fewshot_studio.data.augment import omniglot_augment, photo_augment

    c = pre.channels
    mean = torch.tensor(pre.mean, dtype=torch.float32).expand(c).reshape(1, c, 1, 1)
    std = torch.tensor(pre.std, dtype=torch.float32).expand(c).reshape(1, c, 1, 1)

    def augment(x: Tensor, generator: torch.Generator) -> Tensor:
        m, s = mean.to(x.device), std.to(x.device)
        pixels = x * s + m
        if c == 1:
            out = omniglot_augment(pixels, generator, strength=strength)
        else:
            out = photo_augment(pixels.clamp(0.0, 1.0), generator, x.shape[-1],
                                strength=strength)
        return (out - m) / s

    return augment


@contextlib.contextmanager
def _suffix_only(model: FewShotClassifier, split: Split) -> Iterator[FewShotClassifier]:
    """``model`` whose ``embed`` takes the prefix's maps and runs only ``split.suffix`` (and
    the method's pooling) while the block runs; its backbone is restored after."""
    backbone = model.backbone
    try:
        model.backbone = split.suffix
        yield model
    finally:
        model.backbone = backbone


def embed_from_prefix(model: FewShotClassifier, maps: Tensor, blocks: int) -> Tensor:
    """``model.embed`` of images whose frozen prefix maps (for ``blocks``) are ``maps``
    ``(n, *m)``: ``(n, *feature_shape)``. The prefix is the same for a model and its
    fine-tuned copies, so callers embed it once (:func:`prefix_maps`)."""
    with _suffix_only(model, split_backbone(model, blocks)) as m:
        return m.embed(maps)


@torch.no_grad()
def prefix_maps(model: FewShotClassifier, images: Tensor, blocks: int) -> Tensor:
    """``(n, C, H, W)`` normalised images -> ``(n, *m)`` maps of the frozen prefix."""
    return split_backbone(model, blocks).prefix(images)


def view_bank(model: FewShotClassifier, images: Tensor, augment: Augment,
              settings: FinetuneSettings) -> Iterator[Progress]:
    """The frozen prefix's maps of ``images (n_s, C, H, W)`` as they are and of
    ``settings.views`` augmented views of them: Progress per view (``done`` of ``views +
    1``); the last payload is the ``(views + 1, n_s, *m)`` bank. ``model`` is unchanged."""
    gen = torch.Generator(device=images.device).manual_seed(settings.seed)
    bank = [prefix_maps(model, images, settings.blocks)]
    yield Progress(1, settings.views + 1, message="augmented views")
    for v in range(settings.views):
        with torch.no_grad():
            bank.append(prefix_maps(model, augment(images, gen), settings.blocks))
        yield Progress(v + 2, settings.views + 1, message="augmented views",
                       payload=torch.stack(bank) if v + 1 == settings.views else None)


def _episode_classes(n_way: int, way: int | None, generator: torch.Generator) -> Tensor:
    """The classes of one pseudo-episode: all, or ``way`` of them at random."""
    if way is None or way >= n_way:
        return torch.arange(n_way)
    return torch.randperm(n_way, generator=generator)[:way].sort().values


def finetune_on_bank(model: FewShotClassifier, bank: Tensor, labels: Tensor,
                     settings: FinetuneSettings, n_way: int | None = None
                     ) -> Iterator[Progress]:
    """Train a deep copy of ``model``'s trainable suffix on a :func:`view_bank` ``bank
    (views + 1, n_s, *m)`` of support images with integer ``labels (n_s,)`` in
    ``[0, n_way)``. Progress per step (``done`` of ``steps``, metric ``loss``); the last
    payload (one more Progress, after the last step) is the adapted copy, in eval mode, no
    gradients. ``model`` is unchanged."""
    n_way = int(labels.max()) + 1 if n_way is None else n_way
    adapted = copy.deepcopy(model).eval()
    split = split_backbone(adapted, settings.blocks)
    adapted.requires_grad_(False)
    params = split.parameters()
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=settings.lr)
    gen = torch.Generator().manual_seed(settings.seed + 1)
    labels = labels.to(bank.device)
    with _suffix_only(adapted, split):
        for step in range(settings.steps):
            loss = _step_loss(adapted, bank, labels, n_way, settings, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            yield Progress(step + 1, settings.steps, message="fine-tuning",
                           metrics={"loss": float(loss.detach())})
    adapted.requires_grad_(False)  # whole again (its own backbone) before anyone sees it
    yield Progress(settings.steps, settings.steps, message="fine-tuned", payload=adapted)


def finetune(model: FewShotClassifier, images: Tensor, labels: Tensor, augment: Augment,
             settings: FinetuneSettings, n_way: int | None = None) -> Iterator[Progress]:
    """Fine-tune a deep copy of ``model`` on the support set ``images (n_s, C, H, W)``
    (normalised, on the model's device) with integer ``labels (n_s,)`` in ``[0, n_way)``:
    :func:`view_bank` then :func:`finetune_on_bank`.

    Yields :class:`Progress` (``done`` of ``views + 1 + steps``; metric ``loss`` while
    training); the last one (``done == total`` again) carries the adapted copy, in eval
    mode, as its ``payload``. The input model
    is never changed. Closing the generator cancels."""
    total = settings.views + 1 + settings.steps
    bank: Tensor | None = None
    for p in view_bank(model, images, augment, settings):
        bank = p.payload if p.payload is not None else bank
        yield Progress(p.done, total, p.message)
    assert bank is not None
    for p in finetune_on_bank(model, bank, labels, settings, n_way):
        yield Progress(settings.views + 1 + p.done, total, p.message, p.metrics, p.payload)


def _split_class(members: Tensor, query: int, generator: torch.Generator
                 ) -> tuple[Tensor, Tensor, bool]:
    """One class's pseudo-episode: ``(support rows, query rows, same)``. With more than
    ``query`` images, ``query`` of them (at random) are held out as queries; else (and with
    ``query=0``) every image is both, ``same`` True: its clean view in the support, an
    augmented view as the query (P>M>F)."""
    if query <= 0 or members.numel() <= query:
        return members, members, True
    perm = members[torch.randperm(members.numel(), generator=generator).to(members.device)]
    return perm[query:], perm[:query], False


def _step_loss(model: FewShotClassifier, bank: Tensor, labels: Tensor, n_way: int,
               settings: FinetuneSettings, generator: torch.Generator) -> Tensor:
    """One pseudo-episode's loss on ``bank (V + 1, n_s, *m)``: for each of the episode's
    classes (:func:`_episode_classes`) support and query rows (:func:`_split_class`); queries
    are random augmented views; held-out splits' supports random views (the clean one
    included), the others' the clean view."""
    classes = _episode_classes(n_way, settings.way, generator)
    s_rows, s_views, q_rows, y_s, y_q = [], [], [], [], []
    n_views = bank.shape[0]
    for k, c in enumerate(classes.tolist()):
        members = torch.nonzero(labels == c).flatten()
        sup, qry, same = _split_class(members, settings.query, generator)
        s_rows.append(sup)
        s_views.append(torch.zeros(sup.numel(), dtype=torch.long) if same else
                       torch.randint(0, n_views, (sup.numel(),), generator=generator))
        q_rows.append(qry)
        y_s.append(torch.full((sup.numel(),), k, dtype=torch.long))
        y_q.append(torch.full((qry.numel(),), k, dtype=torch.long))
    sr, qr = torch.cat(s_rows).to(bank.device), torch.cat(q_rows).to(bank.device)
    sv = torch.cat(s_views).to(bank.device)
    qv = torch.randint(1, n_views, (qr.numel(),), generator=generator).to(bank.device)
    feats = model.embed(torch.cat([bank[sv, sr], bank[qv, qr]]))
    ys, yq = torch.cat(y_s).to(bank.device), torch.cat(y_q).to(bank.device)
    predictor = model.fit(feats[:sr.numel()], ys, classes.numel())
    return model.loss(predictor(feats[sr.numel():]), yq)
