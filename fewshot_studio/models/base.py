"""The one method contract (after easyfsl's ``FewShotClassifier``).

Every method splits into two parts:

* ``embed(images)``: the part that does not depend on the support set. Its output is what the
  labeling engine caches per image and what is exported to ONNX. ProtoNet: backbone features;
  Relation Network: backbone feature maps; ANIL: backbone features; full MAML: the preprocessed
  image itself (identity), since every weight adapts.
* ``fit(support_features, support_labels)``: adapt to a support set and return a
  :class:`Predictor` that scores query features -> ``(n_query, n_way)`` logits.

``forward(support_images, support_labels, query_images)`` chains the two for training/eval.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Predictor(Protocol):
    """An adapted classifier: ``(n_query, *feature_shape)`` -> ``(n_query, n_way)`` logits."""

    def __call__(self, query_features: Tensor) -> Tensor: ...


@dataclass(frozen=True, eq=False)
class LinearLogits:
    """A predictor's logits as one matrix product, declared by
    :meth:`FewShotClassifier.linear_logits`: for flattened ``(n_q, d)`` queries ``q``,
    ``logits(q) = scale * (q @ weight.T + bias - norm_coef * |q|^2)``, ``weight (n_way, d)``,
    ``bias (n_way,)``. The last term is the same for every class of a query: the softmax
    ignores it (the engine scores with the rest and adds it back to the largest logit only)."""

    weight: Tensor
    bias: Tensor
    scale: float = 1.0
    norm_coef: float = 0.0


class FewShotClassifier(nn.Module, ABC):
    """Base class of all few-shot methods.

    Subclasses set ``method_name`` (their registry name) and implement :meth:`fit`;
    :meth:`config` returns the constructor kwargs that rebuild the method from a checkpoint.
    """

    method_name: str = ""
    # -- declared capabilities (read by the engine, the evaluator and the trainer; never
    # probed): ``supports_refinement``: fit()'s predictors have ``refine()`` (transductive
    # soft k-means); ``fit_needs_grad``: fit() runs a gradient-based inner loop, so it must
    # run with autograd enabled; ``embed_is_identity`` (below): embed() returns its input.
    supports_refinement: bool = False
    fit_needs_grad: bool = False
    # fit_head() applies: features are vectors scored by a linear function of the prototypes,
    # so a logistic-regression head can start from them (the many-shot head, adapt="head")
    linear_head: bool = False

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    @property
    def embed_is_identity(self) -> bool:
        """Whether :meth:`embed` returns the preprocessed image unchanged (full MAML): the
        engine then caches pixels and skips the embedding backend."""
        return False

    # -- the cacheable part -------------------------------------------------------------
    def embed(self, images: Tensor) -> Tensor:
        """``(n, C, H, W)`` float images -> ``(n, *feature_shape)`` features."""
        return self.backbone(images)

    # -- the support-dependent part -----------------------------------------------------
    def probabilities(self, logits: Tensor, temperature: float = 1.0) -> Tensor:
        """``(n, n_way)`` logits -> ``(n, n_way)`` class probabilities of
        ``logits / temperature`` (the calibration temperature; the softmax by default).
        Methods override it if their logits need another link; an override must ignore a
        per-query shift of the logits if the method declares :meth:`linear_logits`."""
        t = float(temperature)
        if t != 1.0:
            logits = logits / t
        return torch.softmax(logits.float(), dim=-1)

    def linear_logits(self, predictor: Predictor) -> LinearLogits | None:
        """The declared fast path: ``predictor``'s logits as a :class:`LinearLogits` (one
        matrix product over every query) when it is one of this method's predictors that
        scores that way; None (the default) to call the predictor."""
        return None

    @abstractmethod
    def fit(self, support_features: Tensor, support_labels: Tensor,
            n_way: int | None = None) -> Predictor:
        """Adapt to ``support_features`` ``(n_support, *feature_shape)`` with integer
        ``support_labels`` ``(n_support,)`` in ``[0, n_way)``; return a Predictor."""

    def fit_head(self, support_features: Tensor, support_labels: Tensor, n_way: int,
                 held_out: Tensor, l2: float, steps: int) -> tuple[Predictor, Tensor]:
        """The many-shot head, for methods that declare ``linear_head``: a regularised
        logistic-regression head fitted on ``(n_s, d)`` support features, starting from the
        prototypes. ``held_out (F, n_s)`` bool: folds to fit without their held-out examples
        as well. Returns ``(predictor fitted on all examples, (F, n_s, n_way) logits of each
        fold's head on the support set)``."""
        raise NotImplementedError(f"{type(self).__name__} has no linear head")

    def forward(self, support_images: Tensor, support_labels: Tensor,
                query_images: Tensor, n_way: int | None = None) -> Tensor:
        """``(n_s, C, H, W)``, ``(n_s,)``, ``(n_q, C, H, W)`` -> ``(n_q, n_way)`` logits.
        ``n_way``: the number of classes when the caller knows it (else inferred from the
        labels, which costs a device sync)."""
        n_s = support_images.shape[0]
        feats = self.embed(torch.cat([support_images, query_images]))
        predictor = self.fit(feats[:n_s], support_labels, n_way)
        return predictor(feats[n_s:])

    def loss(self, logits: Tensor, query_labels: Tensor) -> Tensor:
        """Training loss of ``(n_q, n_way)`` logits against ``(n_q,)`` labels."""
        return F.cross_entropy(logits, query_labels)

    def meta_loss(self, support_images: Tensor, support_labels: Tensor,
                  query_images: Tensor, query_labels: Tensor,
                  n_way: int | None = None) -> tuple[Tensor, Tensor]:
        """Mean loss and accuracy over a task batch.

        Shapes: ``(T, n_s, C, H, W)``, ``(T, n_s)``, ``(T, n_q, C, H, W)``, ``(T, n_q)``.
        ``n_way``: classes per task when known (the trainer passes its ``way``); None infers
        it per task from the labels. Returns scalar tensors ``(loss, accuracy)``. MAML
        overrides this with a vectorised (``torch.func.vmap``) version.
        """
        losses, accs = [], []
        for sx, sy, qx, qy in zip(support_images, support_labels, query_images, query_labels,
                                  strict=True):
            logits = self(sx, sy, qx) if n_way is None else self(sx, sy, qx, n_way=n_way)
            losses.append(self.loss(logits, qy))
            accs.append((logits.argmax(-1) == qy).float().mean())
        return torch.stack(losses).mean(), torch.stack(accs).mean().detach()

    def config(self) -> dict[str, Any]:
        """Constructor kwargs (JSON-serialisable, backbone excluded) to rebuild this method."""
        return {}
