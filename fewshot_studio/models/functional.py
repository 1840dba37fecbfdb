"""Pure tensor math shared by the few-shot methods and the labeling engine.

No modules, no state: every function maps tensors to tensors. Shapes use ``n_s`` support
examples, ``n_q`` queries, ``n_way`` classes and ``d`` feature dimensions.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

LogitsFn = Callable[[Tensor, Tensor], Tensor]


def infer_n_way(labels: Tensor, n_way: int | None = None) -> int:
    """``n_way`` if given, else ``max(labels) + 1`` (labels are integers in ``[0, n_way)``)."""
    if n_way is not None:
        return int(n_way)
    if labels.numel() == 0:
        raise ValueError("cannot infer n_way from an empty label tensor")
    return int(labels.max().item()) + 1


def one_hot(labels: Tensor, n_way: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """``(n,)`` integer labels -> ``(n, n_way)`` one-hot matrix of ``dtype``.

    Written as a comparison (not ``F.one_hot``) so that it works under ``torch.func.vmap``.
    """
    classes = torch.arange(n_way, device=labels.device)
    return (labels.long().unsqueeze(-1) == classes).to(dtype)


def class_sums(features: Tensor, labels: Tensor, n_way: int) -> tuple[Tensor, Tensor]:
    """Per-class sums of ``(n_s, *shape)`` features and the per-class counts.

    Returns ``(sums (n_way, *shape), counts (n_way,))``. Works for vectors and feature maps.
    """
    flat = features.reshape(features.shape[0], -1)
    onehot = one_hot(labels, n_way, flat.dtype)  # (n_s, n_way)
    sums = onehot.t() @ flat  # (n_way, prod(shape))
    return sums.reshape(n_way, *features.shape[1:]), onehot.sum(0)


def prototypes(features: Tensor, labels: Tensor, n_way: int | None = None) -> Tensor:
    """Class means (Snell et al. 2017): ``(n_s, d)`` features, ``(n_s,)`` labels in
    ``[0, n_way)`` -> ``(n_way, d)`` prototypes. Also works for ``(n_s, *shape)`` maps.

    A class without any support example gets a zero prototype (and its count is clamped to
    avoid a division by zero); callers should not ask for such classes.
    """
    n_way = infer_n_way(labels, n_way)
    sums, counts = class_sums(features, labels, n_way)
    shape = (n_way,) + (1,) * (features.dim() - 1)
    return sums / counts.clamp_min(1).reshape(shape)


def squared_euclidean_logits(query: Tensor, protos: Tensor) -> Tensor:
    """``-||q - p||^2``: ``(n_q, d)`` queries, ``(n_way, d)`` prototypes -> ``(n_q, n_way)``.

    Computed as ``2 q.p - |q|^2 - |p|^2`` (one matrix product: fast for 60-way training
    episodes and large engine batches), clamped so that a distance is never negative.
    """
    sq = (query.pow(2).sum(-1, keepdim=True) - 2.0 * query @ protos.t()
          + protos.pow(2).sum(-1).unsqueeze(0))
    return -sq.clamp_min(0.0)


def cosine_logits(query: Tensor, protos: Tensor, scale: float | Tensor = 10.0) -> Tensor:
    """``scale * cos(q, p)``: ``(n_q, d)``, ``(n_way, d)`` -> ``(n_q, n_way)``."""
    q = F.normalize(query, dim=-1, eps=1e-8)
    p = F.normalize(protos, dim=-1, eps=1e-8)
    return scale * (q @ p.t())


def soft_kmeans_refine(protos: Tensor, support_features: Tensor, support_labels: Tensor,
                       query_features: Tensor, n_iters: int = 1, temperature: float = 1.0,
                       logits_fn: LogitsFn | None = None) -> Tensor:
    """Transductive prototype refinement by soft k-means (Ren et al. 2018).

    Each iteration assigns every query softly to the classes, ``z = softmax(logits(q, p) /
    temperature)``, and recomputes each prototype as the weighted mean of its support
    examples (hard assignments, weight 1) and the queries (soft assignments):
    ``p_c = (sum_i s_i [y_i = c] + sum_j z_jc q_j) / (n_c + sum_j z_jc)``.

    Shapes: ``protos (n_way, d)``, ``support_features (n_s, d)``, ``support_labels (n_s,)``,
    ``query_features (n_q, d)`` -> refined ``(n_way, d)``; feature maps ``(n, *shape)`` work
    the same (averaged element-wise). ``logits_fn`` defaults to
    :func:`squared_euclidean_logits`; pass the method's own scoring (e.g. cosine, or a
    relation module's scores) to match it. With ``n_iters=0`` or no queries the prototypes
    are returned unchanged.
    """
    if logits_fn is None:
        logits_fn = squared_euclidean_logits
    if n_iters <= 0 or query_features.shape[0] == 0:
        return protos
    n_way, shape = protos.shape[0], protos.shape
    sums, counts = class_sums(support_features, support_labels, n_way)
    sums, flat_q = sums.reshape(n_way, -1), query_features.reshape(query_features.shape[0], -1)
    for _ in range(n_iters):
        z = torch.softmax(logits_fn(query_features, protos) / temperature, dim=-1)  # (n_q, n_way)
        protos = ((sums + z.t() @ flat_q) / (counts + z.sum(0)).unsqueeze(-1)).reshape(shape)
    return protos


def accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    """Fraction of ``(n, n_way)`` logits whose argmax equals ``(n,)`` labels (scalar)."""
    return (logits.argmax(-1) == labels).float().mean()


def batch_stat_norm(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None,
                    eps: float = 1e-5) -> Tensor:
    """Batch normalisation with the statistics of this batch only: ``(n, C, *spatial)`` ->
    same shape, normalised per channel over all other dims (biased variance), then
    ``* weight + bias`` (``(C,)`` each). Equals ``F.batch_norm(x, None, None, weight, bias,
    training=True, eps=eps)``.

    Under a ``torch.func`` transform (vmap, grad) it is built from elementary ops, because
    native ``batch_norm``'s second-order gradients under ``vmap`` are wrong as of torch 2.13
    (see tests/test_maml.py); otherwise it calls the (faster) native op.
    """
    if not _functorch_active():
        return F.batch_norm(x, None, None, weight, bias, training=True, eps=eps)
    dims = [0, *range(2, x.dim())]
    var, mean = torch.var_mean(x, dim=dims, unbiased=False, keepdim=True)
    scale = torch.rsqrt(var + eps)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    if weight is not None:
        scale = scale * weight.reshape(shape)
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.reshape(shape)
    return x * scale + shift


def _functorch_active() -> bool:
    """Whether a torch.func transform (vmap, grad, ...) is running around this call."""
    probe = getattr(torch._C, "_are_functorch_transforms_active", None)
    return True if probe is None else bool(probe())
