"""Tiny MAML models and tasks shared by the MAML tests (generated, float64)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fewshot_studio.models import create_backbone
from fewshot_studio.models.maml import MAMLClassifier

DT = torch.float64


def small_maml(**kw: object) -> MAMLClassifier:
    """MAML on a 8-channel Conv4 for 14 px grayscale (batch statistics unless ANIL)."""
    torch.manual_seed(0)
    anil = bool(kw.get("anil", False))
    bb = create_backbone("conv4", in_channels=1, image_size=14, hidden=8, pool_layers=3,
                         track_running_stats=anil)
    return MAMLClassifier(bb, **kw).to(DT)  # type: ignore[arg-type]


def image_tasks(t: int, n_way: int, shots: int, queries: int,
                seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``t`` tasks of random 14 px images, ``n_way * shots`` support and
    ``n_way * queries`` query images each, labels cycling over the classes."""
    g = torch.Generator().manual_seed(seed)
    sx = torch.randn(t, n_way * shots, 1, 14, 14, generator=g, dtype=DT)
    qx = torch.randn(t, n_way * queries, 1, 14, 14, generator=g, dtype=DT)
    sy = torch.arange(n_way).repeat(shots).expand(t, -1)
    qy = torch.arange(n_way).repeat(queries).expand(t, -1)
    return sx, sy, qx, qy



class Pixels(nn.Module):
    """A parameter-free backbone: ``(n, 1, 14, 14)`` images (or ``(n, d)`` vectors) ->
    ``(n, 196)`` pixels (``(n, d)``)."""

    feature_shape = (196,)

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1)
