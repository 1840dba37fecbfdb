"""Prototypical Networks (Snell et al. 2017): class prototypes are the mean embedded support
examples; a query's logits are its negative squared Euclidean distances to them (or scaled
cosine similarities)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fewshot_studio.models import functional as Fn
from fewshot_studio.models.base import FewShotClassifier
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
    can_refine = True

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

    def config(self) -> dict[str, Any]:
        return {"distance": self.distance, "scale": self.init_scale,
                "learn_scale": self.learn_scale, "pool": self.pool}
