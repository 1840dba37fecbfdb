"""Relation Network (Sung et al. 2018): a learned relation module scores each (query, class)
pair of feature maps; trained with MSE against one-hot targets.

Optionally (``skip="cosine"``) the module learns a residual on top of a scaled cosine
similarity: ``score = a * cos(q, c) + b + g(q, c)``, ``g``'s last layer starting at zero. A
model built on a pretrained backbone then starts exactly as good as nearest-centroid with
cosine similarity, and meta-training can only move it from there."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewshot_studio.models import functional as Fn
from fewshot_studio.models.base import FewShotClassifier
from fewshot_studio.models.registry import METHODS

MODULES = ("conv", "mlp")
AGGREGATES = ("mean", "sum")
SKIPS = ("none", "cosine")


def _backbone_feature_shape(backbone: nn.Module) -> tuple[int, ...]:
    shape = getattr(backbone, "feature_shape", None)
    if shape is None:
        raise ValueError("the Relation Network needs a backbone with a `feature_shape` attribute")
    return tuple(int(s) for s in shape)


class ConvRelationModule(nn.Module):
    """2 x [conv3x3-hidden, BN, ReLU, maxpool 2 (when the map is at least 2x2)] -> FC(fc_hidden)
    -> ReLU -> FC(1), on the channel concatenation of a query map and a class map.

    The first convolution is linear in its input, so ``conv([q; c]) = conv_q(q) + conv_c(c)``:
    it is applied once per query and once per class, and only the sum is formed per pair.
    ``pairs(query (n_q, C, h, w), classes (n_way, C, h, w))`` -> ``(n_q, n_way)`` scores.
    """

    def __init__(self, channels: int, height: int, width: int, hidden: int = 64,
                 fc_hidden: int = 8) -> None:
        super().__init__()
        self.channels = channels
        self.conv1 = nn.Conv2d(2 * channels, hidden, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.pool1 = min(height, width) >= 2
        h, w = (height // 2, width // 2) if self.pool1 else (height, width)
        self.conv2 = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.pool2 = min(h, w) >= 2
        h, w = (h // 2, w // 2) if self.pool2 else (h, w)
        self.fc1 = nn.Linear(hidden * h * w, fc_hidden)
        self.fc2 = nn.Linear(fc_hidden, 1)

    def pairs(self, query: Tensor, classes: Tensor) -> Tensor:
        c = self.channels
        w, b = self.conv1.weight, self.conv1.bias
        # concatenation order (class, query), as in Sung et al.
        a = F.conv2d(classes, w[:, :c], b, padding=1)  # (n_way, hidden, h, w)
        q = F.conv2d(query, w[:, c:], None, padding=1)  # (n_q, hidden, h, w)
        x = (q.unsqueeze(1) + a.unsqueeze(0)).flatten(0, 1)  # (n_q * n_way, hidden, h, w)
        x = F.relu(self.bn1(x))
        if self.pool1:
            x = F.max_pool2d(x, 2)
        x = F.relu(self.bn2(self.conv2(x)))
        if self.pool2:
            x = F.max_pool2d(x, 2)
        x = self.fc2(F.relu(self.fc1(x.flatten(1))))
        return x.view(query.shape[0], classes.shape[0])

    def last_layer(self) -> nn.Linear:
        return self.fc2


class MLPRelationModule(nn.Module):
    """FC(hidden) -> ReLU -> FC(fc_hidden) -> ReLU -> FC(1) on the concatenation of a query
    vector and a class vector (for large backbones whose maps are average-pooled).
    ``pairs(query (n_q, C), classes (n_way, C))`` -> ``(n_q, n_way)``; the first layer is
    split per input like :class:`ConvRelationModule`'s."""

    def __init__(self, channels: int, hidden: int = 256, fc_hidden: int = 8) -> None:
        super().__init__()
        self.channels = channels
        self.fc1 = nn.Linear(2 * channels, hidden)
        self.fc2 = nn.Linear(hidden, fc_hidden)
        self.fc3 = nn.Linear(fc_hidden, 1)

    def pairs(self, query: Tensor, classes: Tensor) -> Tensor:
        c = self.channels
        a = F.linear(classes, self.fc1.weight[:, :c], self.fc1.bias)  # (n_way, hidden)
        q = F.linear(query, self.fc1.weight[:, c:])  # (n_q, hidden)
        x = F.relu(q.unsqueeze(1) + a.unsqueeze(0))  # (n_q, n_way, hidden)
        return self.fc3(F.relu(self.fc2(x))).squeeze(-1)

    def last_layer(self) -> nn.Linear:
        return self.fc3


@dataclass(frozen=True, eq=False)
class RelationPredictor:
    """Scores queries against fixed class representations ``(n_way, *feature_shape)``:
    ``(n_q, *feature_shape)`` -> ``(n_q, n_way)`` pre-sigmoid relation scores. The support
    ``(n_s, *feature_shape)`` features and ``(n_s,)`` labels are kept for :meth:`refine`."""

    class_features: Tensor
    model: RelationNetwork
    support_features: Tensor | None = None
    support_labels: Tensor | None = None

    def __call__(self, query_features: Tensor) -> Tensor:
        return self.model.scores(query_features, self.class_features)

    def refine(self, query_features: Tensor, n_iters: int = 1,
               temperature: float = 1.0) -> RelationPredictor:
        """Transductive refinement of mean class representations: soft k-means over
        ``(n_q, *feature_shape)`` query features, assigning queries by the softmax of the
        relation scores (Ren et al. 2018's prototype refinement with this model's scoring)."""
        if not self.model.supports_refinement or self.support_features is None \
                or self.support_labels is None:
            raise ValueError("refinement needs mean class representations (aggregate='mean')")
        classes = Fn.soft_kmeans_refine(
            self.class_features, self.support_features, self.support_labels, query_features,
            n_iters=n_iters, temperature=temperature, logits_fn=self.model.scores)
        return RelationPredictor(classes, self.model, self.support_features,
                                 self.support_labels)


@METHODS.register("relation")
class RelationNetwork(FewShotClassifier):
    """Relation Network (Sung et al. 2018).

    ``module="conv"``: the paper's relation module on concatenated feature maps (embed
    returns maps ``(n, C, h, w)``). ``module="mlp"``: an MLP on average-pooled vectors (embed
    returns ``(n, C)``; for large backbones such as EfficientNet-Lite0, whose maps would be
    large to cache). Class representations combine the shots by ``aggregate``: "sum" as in
    the paper, or "mean" (default: robust when classes have different numbers of examples,
    as users' support sets do). ``hidden``: the module's width (default 64 conv / 256 mlp);
    ``fc_hidden``: width of the last hidden FC layer (8 in the paper). ``skip="cosine"``:
    the module learns a residual over ``a * cos(q, c) + b`` (``a``, ``b`` trained, starting at
    ``skip_scale`` and ``-skip_scale / 2``; the module's last layer starts at zero).

    :meth:`fit` predictors return pre-sigmoid relation scores as logits; :meth:`loss` is
    ``MSE(sigmoid(logits), one_hot)``, as in the paper.
    """

    method_name = "relation"

    def __init__(self, backbone: nn.Module, module: str = "conv", aggregate: str = "mean",
                 hidden: int | None = None, fc_hidden: int = 8, skip: str = "none",
                 skip_scale: float = 10.0) -> None:
        super().__init__(backbone)
        if module not in MODULES:
            raise ValueError(f"module must be one of {MODULES}, got {module!r}")
        if aggregate not in AGGREGATES:
            raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
        if skip not in SKIPS:
            raise ValueError(f"skip must be one of {SKIPS}, got {skip!r}")
        self.module_kind = module
        self.aggregate = aggregate
        self.supports_refinement = aggregate == "mean"  # soft k-means refines class means
        self.hidden = int(hidden if hidden is not None else (64 if module == "conv" else 256))
        self.fc_hidden = fc_hidden
        shape = _backbone_feature_shape(backbone)
        self.relation: ConvRelationModule | MLPRelationModule
        if module == "conv":
            if len(shape) != 3:
                raise ValueError(f"module='conv' needs (C, h, w) feature maps, got {shape}")
            self.relation = ConvRelationModule(shape[0], shape[1], shape[2], self.hidden,
                                               fc_hidden)
        else:
            self.relation = MLPRelationModule(shape[0], self.hidden, fc_hidden)
        self.skip = skip
        self.skip_scale = float(skip_scale)
        if skip == "cosine":
            last = self.relation.last_layer()
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
            self.cos_scale = nn.Parameter(torch.tensor(self.skip_scale))
            self.cos_bias = nn.Parameter(torch.tensor(-self.skip_scale / 2))

    def embed(self, images: Tensor) -> Tensor:
        """``(n, C, H, W)`` -> ``(n, C', h, w)`` maps (conv) or ``(n, C')`` vectors (mlp)."""
        feats = self.backbone(images)
        if self.module_kind == "mlp" and feats.dim() == 4:
            return feats.mean(dim=(-2, -1))
        return feats

    def fit(self, support_features: Tensor, support_labels: Tensor,
            n_way: int | None = None) -> RelationPredictor:
        """Per-class sum or mean of the support features -> a :class:`RelationPredictor`."""
        n_way = Fn.infer_n_way(support_labels, n_way)
        if self.aggregate == "mean":
            classes = Fn.prototypes(support_features, support_labels, n_way)
        else:
            classes = Fn.class_sums(support_features, support_labels, n_way)[0]
        return RelationPredictor(classes, self, support_features, support_labels)

    def scores(self, query: Tensor, classes: Tensor) -> Tensor:
        """Pre-sigmoid relation scores: ``(n_q, *feature_shape)`` queries, ``(n_way,
        *feature_shape)`` class representations -> ``(n_q, n_way)``."""
        scores = self.relation.pairs(query, classes)
        if self.skip == "cosine":
            cos = Fn.cosine_logits(query.flatten(1), classes.flatten(1), 1.0)
            scores = scores + self.cos_scale * cos + self.cos_bias
        return scores

    def loss(self, logits: Tensor, query_labels: Tensor) -> Tensor:
        """``MSE(sigmoid(logits), one_hot(labels))`` over ``(n_q, n_way)`` (Sung et al.)."""
        target = Fn.one_hot(query_labels, logits.shape[-1], logits.dtype)
        return F.mse_loss(torch.sigmoid(logits), target)

    def config(self) -> dict[str, Any]:
        config = {"module": self.module_kind, "aggregate": self.aggregate,
                  "hidden": self.hidden, "fc_hidden": self.fc_hidden}
        if self.skip != "none":
            config.update(skip=self.skip, skip_scale=self.skip_scale)
        return config
