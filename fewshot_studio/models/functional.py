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


SHORT_SOFTMAX = 8
"""Up to this many classes :func:`softmax` runs over the first dim of a transposed copy."""


def softmax(x: Tensor) -> Tensor:
    """Softmax over the last dim of ``(..., n)``. torch's CPU kernel is slow over a short
    last dim (5 classes: ~60 us for 3,000 values, ~1 ms for 50,000; over the first dim of a
    transposed copy ~12 us / ~0.12 ms), so up to :data:`SHORT_SOFTMAX` classes it runs
    there; the values differ by float rounding only."""
    if x.dim() < 2 or x.shape[-1] > SHORT_SOFTMAX:
        return torch.softmax(x, dim=-1)
    return torch.softmax(x.movedim(-1, 0).contiguous(), dim=0).movedim(0, -1)


def squared_euclidean_logits(query: Tensor, protos: Tensor) -> Tensor:
    """``-||q - p||^2``: ``(n_q, d)`` queries, ``(n_way, d)`` prototypes -> ``(n_q, n_way)``.

    Computed as ``2 q.p - |q|^2 - |p|^2`` (one matrix product: fast for 60-way training
    episodes and large engine batches), clamped so that a distance is never negative. The
    squared norms come from ``vector_norm`` (10k x 1280 queries: ~2 ms against ~30 ms for
    ``pow(2).sum``, which writes a temporary the size of the queries; gradient 0 at 0).
    """
    sq = (torch.linalg.vector_norm(query, dim=-1, keepdim=True).square()
          - 2.0 * (query @ protos.t())  # not (2 q) @ p: that doubles every query first
          + torch.linalg.vector_norm(protos, dim=-1).square().unsqueeze(0))
    return -sq.clamp_min(0.0)


def cosine_logits(query: Tensor, protos: Tensor, scale: float | Tensor = 10.0) -> Tensor:
    """``scale * cos(q, p)``: ``(n_q, d)``, ``(n_way, d)`` -> ``(n_q, n_way)``."""
    q = F.normalize(query, dim=-1, eps=1e-8)
    p = F.normalize(protos, dim=-1, eps=1e-8)
    return scale * (q @ p.t())


REFINE_CHUNK = 512
"""Queries a chunk in :func:`soft_kmeans_refine` (512 x 1280 floats: 2.6 MB, about a core's
cache)."""


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
    sums = sums.reshape(n_way, -1)
    for _ in range(n_iters):
        # one pass over the queries an iteration, a cache-sized chunk at a time: its logits,
        # then its share of the weighted sums (10k x 1280: 24 ms for 2 iterations, against
        # 38 ms for two passes over the whole matrix)
        weighted, mass = torch.zeros_like(sums), torch.zeros_like(counts)
        for q in query_features.split(REFINE_CHUNK):
            z = softmax(logits_fn(q, protos) / temperature)  # (chunk, n_way)
            weighted = weighted + z.t() @ q.reshape(q.shape[0], -1)
            mass = mass + z.sum(0)
        protos = ((sums + weighted) / (counts + mass).unsqueeze(-1)).reshape(shape)
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


# --------------------------------------------------------------------------------------------
# Held-out folds of a support set, the many-shot linear head and the adaptive unknown rule


def support_folds(labels: Tensor, n_way: int, max_folds: int = 5) -> Tensor:
    """Stratified held-out folds of a support set: ``(n_s,)`` labels -> ``(F, n_s)`` bool,
    True where fold ``f`` holds the example out. The ``j``-th example of a class goes to fold
    ``j % F``, ``F = min(max_folds, largest class)``; a class with a single example is never
    held out, so every fold keeps at least one example of every class. With up to
    ``max_folds`` examples a class this is leave-one-out (one example of each class at a
    time). ``F`` is 0 (an empty ``(0, n_s)`` mask) when no class has two examples."""
    counts = torch.bincount(labels.long(), minlength=n_way)
    n_folds = min(max_folds, int(counts.max().item()) if labels.numel() else 0)
    if n_folds < 2:
        return torch.zeros(0, labels.numel(), dtype=torch.bool)
    onehot = one_hot(labels, n_way, torch.long)  # (n_s, n_way)
    rank = ((onehot.cumsum(0) - 1) * onehot).sum(-1)  # position of each example in its class
    fold = torch.where(counts[labels.long()] >= 2, rank % n_folds, -1)
    return fold.unsqueeze(0) == torch.arange(n_folds).unsqueeze(-1)


def fold_prototypes(features: Tensor, labels: Tensor, n_way: int, held_out: Tensor) -> Tensor:
    """Class means without the held-out examples: ``(n_s, d)``, ``(n_s,)``, ``(F, n_s)`` mask
    -> ``(F, n_way, d)`` prototypes (fold ``f`` from the examples it keeps)."""
    onehot = one_hot(labels, n_way, features.dtype)  # (n_s, n_way)
    keep = (~held_out).to(features.dtype).unsqueeze(-1) * onehot  # (F, n_s, n_way)
    sums = keep.transpose(1, 2) @ features  # (F, n_way, d)
    return sums / keep.sum(1).clamp_min(1).unsqueeze(-1)


def fit_linear_heads(feats: Tensor, labels: Tensor, n_way: int, init_logits: Tensor,
                     train: Tensor, l2: float = 0.1, steps: int = 100) -> tuple[Tensor, Tensor]:
    """Regularised multinomial logistic regression, one head per fold, all in one batch.

    Minimises ``mean_i CE(z_i, y_i) + l2/2 ||W - W0||^2`` over the training examples of each
    fold, where ``z = feats @ W + b`` and ``W0``, ``b0`` is the initial (prototype) head whose
    support logits are ``init_logits``. By the representer theorem ``W - W0`` lies in the span
    of the (centred) support features, so the descent runs on the ``(n_s, n_s)`` Gram matrix,
    not on ``d``: Nesterov's accelerated gradient, step ``1/L`` with ``L`` the loss's largest
    curvature (power iteration), features centred on their mean (better conditioned; the bias
    absorbs the shift). ``steps`` bounds the descent (early stopping regularises too).

    Shapes: ``feats (n_s, d)`` (the head's feature space, e.g. unit vectors for a cosine
    model), ``labels (n_s,)``, ``init_logits (F, n_s, n_way)`` (``feats @ W0_f + b0_f``),
    ``train (F, n_s)`` bool (the examples each fold fits). Returns ``(dW (F, d, n_way), db
    (F, n_way))``: fold ``f``'s head is ``W0_f + dW_f``, ``b0_f + db_f``.
    """
    with torch.no_grad():
        n_folds, n_s, _ = init_logits.shape
        mean = feats.mean(0)
        centred = feats - mean  # (n_s, d)
        gram = centred @ centred.t()  # (n_s, n_s)
        # folds side by side, (n_s, F, n_way): one 2-D matrix product a step
        init = init_logits.transpose(0, 1)
        y = one_hot(labels, n_way, feats.dtype).unsqueeze(1)  # (n_s, 1, n_way)
        w = train.to(feats.dtype)
        w = (w / w.sum(-1, keepdim=True).clamp_min(1)).t().unsqueeze(-1)  # (n_s, F, 1)
        v = torch.ones(n_s, dtype=feats.dtype)
        for _ in range(20):  # largest eigenvalue of the Gram matrix
            v = gram @ v
            v = v / v.norm().clamp_min(1e-12)
        top = float(v @ gram @ v)
        # softmax cross-entropy curvature <= 1/2 per unit of feature (and bias) variance
        lr = 1.0 / (0.5 * (top * float(w.max()) + 1.0) + l2)
        a = torch.zeros_like(init)
        c = torch.zeros(1, n_folds, n_way, dtype=feats.dtype)
        a_prev, c_prev = a, c
        for t in range(steps):
            mom = t / (t + 3.0)
            a_look, c_look = a + mom * (a - a_prev), c + mom * (c - c_prev)
            z = init + (gram @ a_look.reshape(n_s, -1)).reshape(a.shape) + c_look
            g = (softmax(z) - y) * w
            a_prev, c_prev = a, c
            a = a_look - lr * (g + l2 * a_look)
            c = c_look - lr * g.sum(0, keepdim=True)
        dw = centred.t() @ a.transpose(0, 1)  # (F, d, n_way)
        return dw, c.squeeze(0) - mean @ dw


def heldout_logits(fold_logits: Tensor, held_out: Tensor) -> tuple[Tensor, Tensor]:
    """Each held-out example's logits from the fold that held it out: ``(F, n_s, n_way)``
    logits of every fold on the whole support set and the ``(F, n_s)`` mask -> ``(logits
    (m, n_way), index (m,))`` of the ``m`` examples some fold held out."""
    fold = held_out.float().argmax(0)  # (n_s,)
    index = torch.nonzero(held_out.any(0)).flatten()
    return fold_logits[fold[index], index], index


def conformal_pvalues(calibration: Tensor, scores: Tensor) -> Tensor:
    """Split-conformal p-values (Vovk et al. 2005; Angelopoulos & Bates 2021): ``(m,)``
    held-out calibration scores and ``(n,)`` new scores (higher: more typical) -> ``(n,)``
    p-values ``(1 + #{calibration <= score}) / (m + 1)``. A new example drawn like the
    calibration ones gets a p-value <= ``a`` with probability <= ``a``."""
    ranks = torch.searchsorted(calibration.sort().values.contiguous(), scores.contiguous(),
                               right=True)
    return (1.0 + ranks.to(torch.float32)) / (calibration.numel() + 1.0)


def precision_threshold(top_prob: Tensor, correct: Tensor, precision: float) -> float:
    """The smallest top probability above which held-out examples are right at least
    ``precision`` of the time: ``(m,)`` top probabilities and ``(m,)`` bool -> a probability
    (0 when they all are right at every level, 1 when never)."""
    m = int(top_prob.numel())
    order = torch.argsort(top_prob, descending=True)
    right = correct[order].to(torch.float64).cumsum(0)
    ok = torch.nonzero(right / torch.arange(1, m + 1, dtype=torch.float64) >= precision)
    if ok.numel() == 0:
        return 1.0
    last = int(ok.max())
    return 0.0 if last == m - 1 else float(top_prob[order][last])
