"""Layers shared by the backbones and methods: batch-statistics normalisation (what full MAML
needs of its backbone, as in Finn et al. 2017) and the tools that find, install and redirect
it.

* :class:`BatchStatNorm2d`: ``nn.BatchNorm2d(track_running_stats=False)`` from elementary
  ops, exact under ``torch.func`` (vectorised MAML); :func:`norm2d` picks it or a plain
  BatchNorm, which is how every backbone honours ``track_running_stats``.
* :func:`use_vmap_safe_norms`: swap native batch-statistics BatchNorms for it, in place.
* :func:`batch_stat_norms`: the batch-statistics norm layers of a module.
* :func:`reference_statistics`: within a block, those layers normalise with the statistics
  of chosen reference rows (full MAML's predictor: the support set's).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from fewshot_studio.models import functional as Fn


class BatchStatNorm2d(nn.Module):
    """``nn.BatchNorm2d(track_running_stats=False)`` built from elementary ops
    (:func:`~fewshot_studio.models.functional.batch_stat_norm`): ``(n, C, H, W)`` -> same
    shape, normalised with the current batch's statistics in training and evaluation alike.
    Same parameter names (``weight``, ``bias``, ``(C,)`` each) and values; unlike the native
    op, exact second-order gradients under ``torch.func.vmap`` (vectorised MAML)."""

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: Tensor) -> Tensor:
        return Fn.batch_stat_norm(x, self.weight, self.bias, self.eps)


def norm2d(channels: int, track_running_stats: bool = True, eps: float = 1e-5,
           momentum: float = 0.1) -> nn.Module:
    """BatchNorm2d with running statistics, or :class:`BatchStatNorm2d` (batch statistics
    always; ``momentum`` then has no use) without."""
    if track_running_stats:
        return nn.BatchNorm2d(channels, eps=eps, momentum=momentum)
    return BatchStatNorm2d(channels, eps)


def batch_stat_norms(module: nn.Module) -> list[nn.Module]:
    """The batch-statistics norm layers of ``module``: :class:`BatchStatNorm2d`, or a native
    BatchNorm without running statistics."""
    return [m for m in module.modules()
            if isinstance(m, BatchStatNorm2d)
            or (isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.track_running_stats)]


def has_running_stats(module: nn.Module) -> bool:
    """Whether any BatchNorm inside ``module`` keeps running statistics."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
               for m in module.modules())


def use_vmap_safe_norms(module: nn.Module) -> int:
    """Replace, in place, every affine ``nn.BatchNorm2d(track_running_stats=False)`` inside
    ``module`` by the equivalent :class:`BatchStatNorm2d` (same parameter names and values),
    whose second-order gradients under ``torch.func.vmap`` are exact. Returns the count."""
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if (isinstance(child, nn.BatchNorm2d) and not child.track_running_stats
                    and child.affine):
                new = BatchStatNorm2d(child.num_features, child.eps).to(
                    device=child.weight.device, dtype=child.weight.dtype)
                with torch.no_grad():
                    new.weight.copy_(child.weight)
                    new.bias.copy_(child.bias)
                setattr(parent, name, new)
                count += 1
    return count


@contextlib.contextmanager
def reference_statistics(module: nn.Module, groups: int, ref_rows: int) -> Iterator[None]:
    """Within the block, every batch-statistics norm layer of ``module`` normalises its input
    ``(n, C, *spatial)``, viewed as ``groups`` groups of ``n // groups`` consecutive rows, with
    the mean and (biased) variance of the first ``ref_rows`` rows of each group, then applies
    its (possibly fast, via ``functional_call``) ``weight`` and ``bias``.

    ``groups=1, ref_rows=n_s`` on ``cat([support, queries])``: statistics of the support set
    only, so a query's output does not depend on the other queries."""

    def hook(mod: nn.Module, inputs: tuple[Tensor, ...], _out: Tensor) -> Tensor:
        x = inputs[0]
        g = x.reshape(groups, x.shape[0] // groups, *x.shape[1:])
        ref = g[:, :ref_rows]
        dims = [1, *range(3, g.dim())]
        var, mean = torch.var_mean(ref, dim=dims, unbiased=False, keepdim=True)
        y = (g - mean) * torch.rsqrt(var + mod.eps)
        shape = (1, 1, -1, *([1] * (g.dim() - 3)))
        if mod.weight is not None:
            y = y * mod.weight.view(shape)
        if mod.bias is not None:
            y = y + mod.bias.view(shape)
        return y.reshape(x.shape)

    handles = [m.register_forward_hook(hook) for m in batch_stat_norms(module)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
