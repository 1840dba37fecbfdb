"""Test-time augmentation (TTA): an image's features averaged over fixed views of it.

Unlike transductive refinement it looks at one image at a time, so it holds whatever the
query folder holds (images of no support class included), and it applies to support and
query images alike. Each view is one fixed transformation, the same for every image and
batch (drawn once from ``seed``), so an image's averaged features do not depend on what it
was batched with and can be cached.

Views by kind of image (:func:`tta_kind`, from the checkpoint's preprocessing):

- ``"characters"`` (grayscale): view 0 is the image; the others are small affine warps and
  stroke-thickness changes, the character augmentation of training at ``strength``
  (:func:`~fewshot_studio.data.augment.omniglot_augment`'s ranges).
- ``"photos"`` (RGB): the image and its mirror image (any ``n_views`` >= 2 gives these two).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from fewshot_studio.data.augment import (
    THICKNESS_AMOUNT,
    affine,
    random_affine_theta,
    thicken,
)
from fewshot_studio.data.preprocess import Preprocess

TTA_VIEWS = 8  # views per image (the image included) when asked without a number
TTA_STRENGTH = 0.5  # the character warps' strength (training uses 0.5: `--augment-strength`)


def tta_kind(pre: Preprocess) -> str:
    """``"characters"`` for grayscale inputs, else ``"photos"``."""
    return "characters" if pre.channels == 1 else "photos"


def effective_views(n_views: int, kind: str) -> int:
    """How many views ``n_views`` gives for ``kind`` (photos have two at most); <= 1: none."""
    if n_views <= 1:
        return 1
    return min(n_views, 2) if kind == "photos" else n_views


def tta_views(x: Tensor, n_views: int, kind: str, seed: int = 0,
              strength: float = TTA_STRENGTH) -> list[Tensor]:
    """``(B, C, H, W)`` normalised images -> the :func:`effective_views` views of each, the
    first the images themselves, each ``(B, C, H, W)``."""
    n = effective_views(n_views, kind)
    views = [x]
    if n == 1:
        return views
    if kind == "photos":
        return [x, x.flip(-1)]
    g = torch.Generator().manual_seed(seed)
    for _ in range(n - 1):
        theta = random_affine_theta(1, g, x.device, strength=strength)
        frac = strength * THICKNESS_AMOUNT * torch.rand(1, generator=g)
        use_dilate = torch.rand(1, generator=g) < 0.5
        views.append(thicken(affine(x, theta), frac.to(x.device), use_dilate.to(x.device)))
    return views


def embed_tta(embed: Callable[[Tensor], Tensor], x: Tensor, n_views: int, kind: str,
              seed: int = 0) -> Tensor:
    """``embed`` (``(B, C, H, W)`` -> ``(B, *feature_shape)``) averaged over
    :func:`tta_views` of ``x``; with one view, ``embed(x)``."""
    views = tta_views(x, n_views, kind, seed)
    out = embed(views[0])
    for v in views[1:]:
        out = out + embed(v)
    return out / len(views)
