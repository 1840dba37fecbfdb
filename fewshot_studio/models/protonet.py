"""Prototypical Networks (Snell et al. 2017): class prototypes are the mean embedded support
examples; a query's logits are its negative squared Euclidean distances to them (or scaled
cosine similarities)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewshot_studio.models import functional as Fn
from fewshot_studio.models.base import FewShotClassifier, LinearLogits, Predictor
from fewshot_studio.models.registry import METHODS

DISTANCES = ("euclidean", "cosine")
POOLS = ("flatten", "avg")


@dataclass(frozen=True, eq=False)
class ProtoPredictor:
    """Scores queries against fixed prototypes.

    ``prototypes`` ``(n_way, d)``; ``support_features`` ``(n_s, d)`` and ``support_labels``
    ``(n_s,)`` are kept for transductive refinement. Calling it maps ``(n_q, d)`` query
    features to ``(n_q, n_way)`` logits.
    """

    prototypes: Tensor
    support_features: Tensor
    support_labels: Tensor
    model: ProtoNet

    def __call__(self, query_features: Tensor) -> Tensor:
        return self.model.logits(query_features, self.prototypes)

    def refine(self, query_features: Tensor, n_iters: int = 1,
               temperature: float = 1.0) -> ProtoPredictor:
        """A predictor whose prototypes are refined by soft k-means over ``(n_q, d)`` query
        features (Ren et al. 2018), scored with this model's own distance."""
        protos = Fn.soft_kmeans_refine(
            self.prototypes, self.support_features, self.support_labels, query_features,
            n_iters=n_iters, temperature=temperature, logits_fn=self.model.logits)
        return ProtoPredictor(protos, self.support_features, self.support_labels, self.model)


@dataclass(frozen=True, eq=False)
class LinearPredictor:
    """The many-shot head: ``(n_q, d)`` query features -> ``(n_q, n_way)`` logits
    ``head_features(q) @ weight + bias + head_offset(q)``; ``weight (d, n_way)``, ``bias
    (n_way,)``."""

    weight: Tensor
    bias: Tensor
    model: ProtoNet

    def __call__(self, query_features: Tensor) -> Tensor:
        m = self.model
        flat = query_features.reshape(query_features.shape[0], -1)
        # (n_way, d) @ (d, n): ~2x faster than (n, d) @ (d, n_way) for a few classes
        z = (self.weight.t() @ flat.t()).t()
        if m.distance == "cosine":  # head_features(q) = q / |q|, applied after the product
            z = z / torch.linalg.vector_norm(flat, dim=-1, keepdim=True).clamp_min(1e-8)
        return z + self.bias + m.head_offset(flat)


@METHODS.register("protonet")
class ProtoNet(FewShotClassifier):
    """Prototypical Networks: nearest class mean in embedding space.

    ``distance``: "euclidean" (logits ``-scale * ||q - p||^2``) or "cosine" (logits
    ``scale * cos(q, p)``). ``scale`` defaults to 1 (euclidean) or 10 (cosine);
    ``learn_scale`` makes it a trained parameter. ``pool``: how backbone maps become vectors,
    "flatten" (small backbones, as in the paper) or "avg" (global average pooling, for large
    backbones such as EfficientNet-Lite0).
    """

    method_name = "protonet"
    supports_refinement = True
    linear_head = True

    def __init__(self, backbone: nn.Module, distance: str = "euclidean",
                 scale: float | None = None, learn_scale: bool = False,
                 pool: str = "flatten") -> None:
        super().__init__(backbone)
        if distance not in DISTANCES:
            raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        self.distance = distance
        self.pool = pool
        self.learn_scale = learn_scale
        self.init_scale = float(scale if scale is not None else
                                (1.0 if distance == "euclidean" else 10.0))
        if learn_scale:
            self.scale: Tensor | float = nn.Parameter(torch.tensor(self.init_scale))
        else:
            self.scale = self.init_scale

    def embed(self, images: Tensor) -> Tensor:
        """``(n, C, H, W)`` -> ``(n, d)`` embeddings (flattened or average-pooled maps)."""
        feats = self.backbone(images)
        if feats.dim() == 4 and self.pool == "avg":
            return feats.mean(dim=(-2, -1))
        return feats.flatten(1)

    def logits(self, query_features: Tensor, prototypes: Tensor) -> Tensor:
        """``(n_q, d)``, ``(n_way, d)`` -> ``(n_q, n_way)`` logits of this model's distance."""
        if self.distance == "cosine":
            return Fn.cosine_logits(query_features, prototypes, self.scale)
        logits = Fn.squared_euclidean_logits(query_features, prototypes)
        return logits if not self.learn_scale and self.scale == 1.0 else self.scale * logits

    def fit(self, support_features: Tensor, support_labels: Tensor,
            n_way: int | None = None) -> ProtoPredictor:
        """Prototypes of ``(n_s, d)`` support features -> a :class:`ProtoPredictor`."""
        protos = Fn.prototypes(support_features, support_labels, n_way)
        return ProtoPredictor(protos, support_features, support_labels, self)

    def linear_logits(self, predictor: Predictor) -> LinearLogits | None:
        """With the Euclidean distance this model's predictors score in one matrix product:
        prototypes ``-s ||q - p||^2 = s (2 q.p - |p|^2 - |q|^2)``, the many-shot head
        ``q @ W + b - s |q|^2`` (:meth:`head_offset`). None for the cosine distance (it
        normalises the queries) and for another model's predictors."""
        if self.distance != "euclidean":
            return None
        if isinstance(predictor, ProtoPredictor) and predictor.model is self:
            p = predictor.prototypes.detach().reshape(predictor.prototypes.shape[0], -1).float()
            return LinearLogits(2.0 * p, -p.pow(2).sum(-1), float(self.scale), 1.0)
        if isinstance(predictor, LinearPredictor) and predictor.model is self:
            return LinearLogits(predictor.weight.detach().t().float(),
                                predictor.bias.detach().float(), 1.0, float(self.scale))
        return None

    def head_features(self, features: Tensor) -> Tensor:
        """``(n, d)`` features -> the linear head's inputs: unit vectors (cosine) or as they
        are (Euclidean), so that the prototypes' logits are linear in them."""
        features = features.reshape(features.shape[0], -1)
        return F.normalize(features, dim=-1, eps=1e-8) if self.distance == "cosine" \
            else features

    def head_offset(self, features: Tensor) -> Tensor:
        """``(n, d)`` features -> ``(n, 1)``: the per-query term of the prototypes' logits
        that is not linear in :meth:`head_features`: ``-scale |q|^2`` (Euclidean), 0 (cosine).
        The head keeps it: softmax ignores it, but a far-away query keeps a low top logit (what
        the adaptive unknown rule reads)."""
        if self.distance == "cosine":
            return features.new_zeros(features.shape[0], 1)
        s = self.scale.detach() if isinstance(self.scale, Tensor) else self.scale
        flat = features.reshape(features.shape[0], -1)
        return -s * torch.linalg.vector_norm(flat, dim=-1, keepdim=True).square()

    def prototype_head(self, prototypes: Tensor) -> tuple[Tensor, Tensor]:
        """``(..., n_way, d)`` prototypes -> the linear head with their logits (less
        :meth:`head_offset`): ``(weight (..., d, n_way), bias (..., n_way))``. Cosine:
        ``scale * p / |p|`` and 0; Euclidean: ``2 scale p`` and ``-scale |p|^2``."""
        s = self.scale.detach() if isinstance(self.scale, Tensor) else self.scale
        if self.distance == "cosine":
            w = s * F.normalize(prototypes, dim=-1, eps=1e-8)
            return w.transpose(-1, -2), torch.zeros(prototypes.shape[:-1])
        return 2.0 * s * prototypes.transpose(-1, -2), -s * prototypes.pow(2).sum(-1)

    def fit_head(self, support_features: Tensor, support_labels: Tensor, n_way: int,
                 held_out: Tensor, l2: float, steps: int) -> tuple[LinearPredictor, Tensor]:
        """Logistic regression on the ``(n_s, d)`` support features, from the prototypes'
        head, for every fold of ``held_out (F, n_s)`` and for all examples in one batch
        (:func:`~fewshot_studio.models.functional.fit_linear_heads`). Returns the head on all
        examples and the ``(F, n_s, n_way)`` support logits of each fold's head."""
        feats = support_features.reshape(support_features.shape[0], -1).float()
        phi = self.head_features(feats)  # (n_s, d)
        everything = torch.zeros(1, feats.shape[0], dtype=torch.bool)
        out = torch.cat([held_out, everything])  # (F + 1, n_s): the last fold keeps all
        weight0, bias0 = self.prototype_head(
            Fn.fold_prototypes(feats, support_labels, n_way, out))  # (F+1, d, w), (F+1, w)
        init = phi @ weight0 + bias0.unsqueeze(1)  # (F + 1, n_s, n_way)
        dw, db = Fn.fit_linear_heads(phi, support_labels, n_way, init, ~out, l2, steps)
        weight, bias = weight0 + dw, bias0 + db
        head = LinearPredictor(weight[-1], bias[-1], self)
        return head, phi @ weight[:-1] + bias[:-1].unsqueeze(1) + self.head_offset(feats)

    def config(self) -> dict[str, Any]:
        return {"distance": self.distance, "scale": self.init_scale,
                "learn_scale": self.learn_scale, "pool": self.pool}
