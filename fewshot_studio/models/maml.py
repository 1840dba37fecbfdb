"""MAML (Finn et al. 2017), first-order MAML, Meta-SGD (Li et al. 2017) and ANIL (Raghu et al.
2020), with a Proto-MAML head (Triantafillou et al. 2020) so one model serves any number of
classes.

:class:`MAMLClassifier`, the few-shot method registered as ``"maml"``, adapts with the one
MAML inner loop, :class:`~fewshot_studio.models.maml_core.MAMLLearner` (``torch.func.grad``;
second order unless ``first_order``; Meta-SGD rates), whose learner runs the network with a
Proto-MAML head: ANIL = backbone features + MAML(head); full MAML = MAML(backbone + head).
:meth:`~MAMLClassifier.fit` adapts one task; :meth:`~MAMLClassifier.meta_loss` runs the same
per-task function vectorised over a task batch (``torch.func.vmap``); :func:`meta_loss_loop`
runs it one task at a time (the benchmarks' baseline). :class:`MAML`, the learn2learn-style
face of the same learner for any module, is re-exported here.

The head: for a task with ``n_way`` classes the linear head is initialised from the support
prototypes ``c_k`` of the (current) features, ``W = 2 c_k``, ``b = -||c_k||^2`` (so before
adaptation the logits equal ProtoNet's up to a per-query constant), then adapted with the
backbone (full MAML) or alone (ANIL). The initialisation stays differentiable, so the outer
loop trains the backbone through it. ANIL predictors also have transductive refinement
(:meth:`MAMLPredictor.refine`: the head's prototypes refined by soft k-means over the queries).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from fewshot_studio.models import functional as Fn
from fewshot_studio.models.base import FewShotClassifier
from fewshot_studio.models.layers import (
    batch_stat_norms,
    has_running_stats,
    reference_statistics,
    use_vmap_safe_norms,
)
from fewshot_studio.models.maml_core import MAML as MAML  # re-exported public API
from fewshot_studio.models.maml_core import MAMLLearner, Params, Rates, _key
from fewshot_studio.models.registry import METHODS, MethodCfg

HEAD_W, HEAD_B = "head.weight", "head.bias"
_BB = "backbone."


def proto_head(support_features: Tensor, support_labels: Tensor, n_way: int,
               norm: Tensor | float | None = None) -> Params:
    """Proto-MAML head initialisation (Triantafillou et al. 2020): ``(n_s, d)`` features ->
    ``{"head.weight": 2 c (n_way, d), "head.bias": -||c||^2 (n_way,)}``. ``norm``: rescale
    every prototype ``c`` to that length first (for features of that length, the head then
    scores ``2 norm^2 cos(q, c) - norm^2``: a cosine classifier for any number of shots)."""
    return head_from_prototypes(Fn.prototypes(support_features, support_labels, n_way), norm)


def head_from_prototypes(protos: Tensor, norm: Tensor | float | None = None) -> Params:
    """The Proto-MAML head of ``(n_way, d)`` prototypes ``c``: ``{"head.weight": 2 c
    (n_way, d), "head.bias": -||c||^2 (n_way,)}``, after rescaling every ``c`` to length
    ``norm`` when given (see :func:`proto_head`)."""
    if norm is not None:
        protos = F.normalize(protos, dim=-1, eps=1e-8) * norm
    return {HEAD_W: 2.0 * protos, HEAD_B: -protos.pow(2).sum(-1)}


QUERY_NORMS = ("support", "support+query", "batch")


def _backbone_needs(method_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """What a configuration needs of its backbone: full MAML, batch statistics (Finn et al.);
    ANIL, nothing."""
    return {} if method_kwargs.get("anil", False) else {"track_running_stats": False}


@dataclass(frozen=True, eq=False)
class MAMLPredictor:
    """Adapted weights closed over: ``(n_q, *feature_shape)`` query features (ANIL: backbone
    features; full MAML: preprocessed images) -> ``(n_q, n_way)`` logits.

    Full MAML (batch-statistics BatchNorm, as in Finn et al.) in eval mode: ``support`` holds
    the ``(n_s, C, H, W)`` support images and the model's ``query_norm`` says which statistics
    normalise the queries, so that (except for ``"batch"``) a query's logits do not depend on
    the other queries it is scored with: ``"support"`` (the adapted network's statistics on
    the support set), ``"support+query"`` (on the support set plus that query alone),
    ``"batch"`` (the query batch itself, Finn et al.; depends on the batch).

    ANIL keeps what :meth:`refine` needs: the ``(n_s, d)`` support features and ``(n_s,)``
    labels, and ``init_prototypes`` ``(n_way, d)``, the prototypes (in the head's feature
    space, before any ``normalize`` rescaling) that the adapted head was initialised from."""

    weights: Params
    model: MAMLClassifier
    support: Tensor | None = None
    support_features: Tensor | None = None
    support_labels: Tensor | None = None
    init_prototypes: Tensor | None = None

    def __call__(self, query_features: Tensor) -> Tensor:
        mode = self.model.query_norm
        if self.support is None or mode == "batch" or self.model.anil:
            return self.model.logits(self.weights, query_features)
        s = self.support.to(query_features.dtype)
        n_s, n_q = s.shape[0], query_features.shape[0]
        if n_q == 0:
            return self.model.logits(self.weights, query_features)
        if mode == "support":
            with reference_statistics(self.model.backbone, 1, n_s):
                return self.model.logits(self.weights, torch.cat([s, query_features]))[n_s:]
        # support+query: one group (support, q_i) per query, each normalised on itself
        groups = torch.cat([s.unsqueeze(0).expand(n_q, *s.shape),
                            query_features.unsqueeze(1)], dim=1)
        with reference_statistics(self.model.backbone, n_q, n_s + 1):
            logits = self.model.logits(self.weights, groups.flatten(0, 1))
        return logits.view(n_q, n_s + 1, -1)[:, n_s]

    def refine(self, query_features: Tensor, n_iters: int = 1,
               temperature: float = 1.0) -> MAMLPredictor:
        """Transductive refinement (ANIL): a predictor whose Proto-MAML head starts from
        prototypes refined by soft k-means over ``(n_q, d)`` query features (Ren et al.
        2018), keeping what the inner loop learnt on the support set.

        The adapted head is ``head(c) + delta``: the Proto-MAML init of the prototypes ``c``
        (``W = 2 c``, ``b = -||c||^2``, ``c`` rescaled when ``normalize``) plus the change
        ``delta`` the inner steps made. Each iteration assigns every query softly to the
        classes with the current head, ``z = softmax(logits / temperature)`` ``(n_q, n_way)``,
        recomputes each prototype as the weighted mean of its support features (weight 1)
        and the queries (weight ``z``), and rebuilds the head as ``head(c') + delta``. The
        ``delta`` is kept rather than re-running the inner loop from ``head(c')``: on the
        bundled omniglot-maml (1000 Omniglot evaluation episodes per protocol, 2 iterations)
        that re-adaptation pulls the head back towards the support set and measured 0.04 to
        0.14 points worse, and adapting on the support set plus the queries with their soft
        labels 0.05 to 1.05 points worse. No gradient step is taken, so it is cheap,
        deterministic, and works under ``torch.no_grad()``.

        Returns a new :class:`MAMLPredictor` mapping ``(n, d)`` features to ``(n, n_way)``
        logits; with ``n_iters=0`` or no queries, one equal to this. Raises ``ValueError``
        for full MAML (whose backbone adapts, so the queries have no fixed features)."""
        sf, sy, protos = self.support_features, self.support_labels, self.init_prototypes
        if not self.model.anil or sf is None or sy is None or protos is None:
            raise ValueError("transductive refinement needs an ANIL MAML predictor "
                             "(anil=True: a fixed backbone, so the queries have features)")
        model = self.model
        keep_graph = torch.is_grad_enabled() and model.training
        with contextlib.nullcontext() if keep_graph else torch.no_grad():
            norm = model.feature_scale if model.normalize else None
            start = head_from_prototypes(protos, norm)
            delta = {n: self.weights[n] - start[n] for n in (HEAD_W, HEAD_B)}

            def head(c: Tensor) -> Params:
                h = head_from_prototypes(c, norm)
                return {n: h[n] + delta[n] for n in (HEAD_W, HEAD_B)}

            def logits_fn(q: Tensor, c: Tensor) -> Tensor:
                return model.logits(head(c), q)

            q = query_features.to(sf.dtype)
            refined = Fn.soft_kmeans_refine(protos, sf, sy, q, n_iters=n_iters,
                                            temperature=temperature, logits_fn=logits_fn)
            weights = self.weights if refined is protos else head(refined)
        return MAMLPredictor(weights, model, None, sf, sy, refined)


@METHODS.register("maml", cfg=MethodCfg(backbone_needs=_backbone_needs))
class MAMLClassifier(FewShotClassifier):
    """MAML / FOMAML / Meta-SGD / ANIL with a Proto-MAML head (any ``n_way`` at test time).

    ``inner_steps``/``inner_lr``: the inner loop while training (``test_inner_steps``, default
    the same, in eval mode); ``first_order``: FOMAML; ``meta_sgd``: learnable per-parameter
    inner rates (per feature for the head, so they do not depend on ``n_way``); ``anil``:
    adapt only the head, ``embed()`` = backbone features (cacheable); otherwise full MAML,
    ``embed()`` = identity and :meth:`fit` adapts the whole network. ``pool``: "flatten" or
    "avg" (global average pooling) of the backbone maps. ``normalize``: L2-normalise the
    pooled features and multiply them by a trained scale ``s`` (starting at
    ``sqrt(scale / 2)``), and initialise the head from prototypes rescaled to that length, so
    that before adaptation it is a cosine classifier, logits ``scale * cos(q, c) - scale / 2``
    for any number of shots; what suits pretrained backbones whose features are compared
    better by angle than by distance.

    Full MAML needs a backbone whose BatchNorm layers use batch statistics
    (``track_running_stats=False``, as in Finn et al.): its registry entry declares it, so
    :func:`~fewshot_studio.models.create_model` builds the backbone that way. Training
    (:meth:`meta_loss`) uses the statistics of the query batch, as in Finn et al.; in eval
    mode the predictor that :meth:`fit` returns normalises queries as ``query_norm`` says
    (default ``"support"``: statistics of the support set under the adapted weights), so a
    query's prediction does not depend on the queries scored with it (see
    :class:`MAMLPredictor`).
    """

    method_name = "maml"
    fit_needs_grad = True  # fit() runs a gradient-based inner loop

    @property  # type: ignore[override]
    def supports_refinement(self) -> bool:
        """ANIL predictors have :meth:`MAMLPredictor.refine` (the backbone's features are
        fixed); full MAML's do not."""
        return bool(self.anil)

    @property
    def embed_is_identity(self) -> bool:
        """Full MAML caches the preprocessed image (every weight adapts); ANIL, features."""
        return not self.anil

    def __init__(self, backbone: nn.Module, inner_steps: int = 1, inner_lr: float = 0.4,
                 first_order: bool = False, meta_sgd: bool = False, anil: bool = False,
                 pool: str = "flatten", test_inner_steps: int | None = None,
                 query_norm: str = "support", normalize: bool = False,
                 scale: float = 10.0) -> None:
        super().__init__(backbone)
        if pool not in ("flatten", "avg"):
            raise ValueError(f"pool must be 'flatten' or 'avg', got {pool!r}")
        if query_norm not in QUERY_NORMS:
            raise ValueError(f"query_norm must be one of {QUERY_NORMS}, got {query_norm!r}")
        self.query_norm = query_norm
        if not anil:
            if has_running_stats(backbone):
                raise ValueError("full MAML needs a backbone with track_running_stats=False "
                                 "(batch statistics, as in Finn et al.); or use anil=True")
            use_vmap_safe_norms(backbone)
        self.inner_steps = int(inner_steps)
        self.test_inner_steps = int(test_inner_steps if test_inner_steps is not None
                                    else inner_steps)
        self.inner_lr = float(inner_lr)
        self.first_order = first_order
        self.meta_sgd = meta_sgd
        self.anil = anil
        self.pool = pool
        self.normalize = normalize
        self.scale = float(scale)
        if normalize:
            self.feature_scale = nn.Parameter(torch.tensor(math.sqrt(self.scale / 2)))
        self.feature_dim = self._feature_dim()
        self.inner_lrs = nn.ParameterDict()
        if meta_sgd:
            for n, shape in self._adapted_shapes().items():
                self.inner_lrs[_key(n)] = nn.Parameter(torch.full(shape, self.inner_lr))

    # -- shapes and names ------------------------------------------------------------------
    def _feature_dim(self) -> int:
        shape = getattr(self.backbone, "feature_shape", None)
        if shape is None:
            raise ValueError("MAML needs a backbone with a `feature_shape` attribute")
        return int(shape[0]) if self.pool == "avg" or len(shape) == 1 else \
            int(torch.Size(shape).numel())

    def _adapted_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {}
        if not self.anil:
            shapes.update({_BB + n: tuple(p.shape) for n, p in self.backbone.named_parameters()})
        shapes[HEAD_W] = (1, self.feature_dim)  # per feature, shared by all classes
        shapes[HEAD_B] = (1,)
        return shapes

    def rates(self) -> Rates:
        """Inner learning rate(s): ``inner_lr`` or name -> Meta-SGD rate tensor."""
        if not self.meta_sgd:
            return self.inner_lr
        return {n: self.inner_lrs[_key(n)] for n in self._adapted_shapes()}

    def _backbone_params(self) -> Params:
        return {_BB + n: p for n, p in self.backbone.named_parameters()}

    # -- the network as a function of its (fast) weights -----------------------------------
    def _pool(self, maps: Tensor) -> Tensor:
        """``(n, C, h, w)`` maps (or ``(n, d)`` vectors) -> ``(n, d)`` head inputs."""
        feats = maps.mean(dim=(-2, -1)) if maps.dim() == 4 and self.pool == "avg" else \
            maps.flatten(1)
        if self.normalize:
            feats = F.normalize(feats, dim=-1, eps=1e-8) * self.feature_scale
        return feats

    def embed(self, images: Tensor) -> Tensor:
        """ANIL: ``(n, C, H, W)`` -> ``(n, d)`` backbone features. Full MAML: identity (every
        weight adapts, so the preprocessed image is what can be cached)."""
        if self.anil:
            return self._pool(self.backbone(images))
        return images

    def features(self, weights: Mapping[str, Tensor], x: Tensor) -> Tensor:
        """``(n, d)`` features of ``x`` (ANIL: ``x`` already is features) under ``weights``
        (backbone entries prefixed ``backbone.``; missing ones are the module's own)."""
        if self.anil:
            return x
        bb = {n[len(_BB):]: v for n, v in weights.items() if n.startswith(_BB)}
        return self._pool(functional_call(self.backbone, bb, (x,), strict=False))

    def logits(self, weights: Mapping[str, Tensor], x: Tensor) -> Tensor:
        """``(n, n_way)`` logits of ``x`` under fast ``weights`` (incl. the head)."""
        return self.features(weights, x) @ weights[HEAD_W].t() + weights[HEAD_B]

    def init_weights(self, support: Tensor, support_labels: Tensor, n_way: int) -> Params:
        """Fast weights before adaptation: the backbone's (full MAML) + the Proto-MAML head
        from the support features."""
        weights = {} if self.anil else self._backbone_params()
        norm = self.feature_scale if self.normalize else None
        weights.update(proto_head(self.features(weights, support), support_labels, n_way, norm))
        return weights

    def _adapted_names(self, weights: Mapping[str, Tensor]) -> list[str]:
        return [n for n in weights if not self.anil or n in (HEAD_W, HEAD_B)]

    # -- adaptation: the one inner loop -----------------------------------------------------
    def learner(self, support: Tensor, support_labels: Tensor, n_way: int,
                first_order: bool | None = None) -> MAMLLearner:
        """The MAML learner of one task before adaptation: the fast weights of
        :meth:`init_weights` (the Proto-MAML head from the ``(n_s, *feature_shape)`` support),
        :meth:`logits` as its forward, the adapted names, :meth:`rates`."""
        weights = self.init_weights(support, support_labels, n_way)
        fo = self.first_order if first_order is None else first_order
        return MAMLLearner(self.logits, weights, self._adapted_names(weights), self.rates(), fo)

    def adapt(self, support: Tensor, support_labels: Tensor, n_way: int, steps: int,
              first_order: bool | None = None) -> Params:
        """The inner loop on one task: ``(n_s, *feature_shape)`` support, ``(n_s,)`` labels ->
        fast weights after ``steps`` SGD steps on the support cross-entropy. Runs under
        ``torch.func.vmap`` (:meth:`meta_loss`) and under ``torch.no_grad()``."""
        learner = self.learner(support, support_labels, n_way, first_order)
        for _ in range(steps):
            learner.adapt(lambda lr: F.cross_entropy(lr(support), support_labels))
        return learner.params

    def fit(self, support_features: Tensor, support_labels: Tensor,
            n_way: int | None = None) -> MAMLPredictor:
        """Adapt to a support set (``inner_steps`` in training mode, ``test_inner_steps`` in
        eval mode) and return a predictor over the adapted weights.

        Differentiable (second order unless ``first_order``) only in training mode with
        autograd enabled; otherwise (eval mode, or under ``no_grad``) the inner loop runs
        first order under ``no_grad`` and the result is detached."""
        n_way = Fn.infer_n_way(support_labels, n_way)
        keep_graph = torch.is_grad_enabled() and self.training
        steps = self.inner_steps if self.training else self.test_inner_steps
        if keep_graph:
            weights = self.adapt(support_features, support_labels, n_way, steps)
        else:
            with torch.no_grad():
                weights = self.adapt(support_features, support_labels, n_way, steps,
                                     first_order=True)
        if self.anil:  # what refine() needs; detached unless fit keeps the graph
            sf = support_features if keep_graph else support_features.detach()
            return MAMLPredictor(weights, self, None, sf, support_labels,
                                 Fn.prototypes(sf, support_labels, n_way))
        # eval mode: queries normalised by `query_norm`; training keeps Finn et al.'s query-batch
        # statistics, exactly as meta_loss computes them
        support = None
        if not self.training and batch_stat_norms(self.backbone):
            support = support_features.detach()
        return MAMLPredictor(weights, self, support)

    # -- the task batch: the same per-task loss, vectorised with torch.func.vmap ------------
    def task_loss(self, support: Tensor, support_labels: Tensor, query: Tensor,
                  query_labels: Tensor, n_way: int) -> tuple[Tensor, Tensor]:
        """One task's query loss and accuracy after the inner loop (``inner_steps`` in
        training mode, ``test_inner_steps`` in eval mode): ``(n_s, *feature_shape)``,
        ``(n_s,)``, ``(n_q, *feature_shape)``, ``(n_q,)`` -> two scalars."""
        steps = self.inner_steps if self.training else self.test_inner_steps
        logits = self.logits(self.adapt(support, support_labels, n_way, steps), query)
        return F.cross_entropy(logits, query_labels), (logits.argmax(-1) == query_labels) \
            .float().mean()

    def meta_loss(self, support_images: Tensor, support_labels: Tensor,
                  query_images: Tensor, query_labels: Tensor,
                  n_way: int | None = None) -> tuple[Tensor, Tensor]:
        """Mean query loss and accuracy over a task batch: :meth:`task_loss` vectorised with
        ``torch.func.vmap``. Shapes: ``(T, n_s, C, H, W)``, ``(T, n_s)``,
        ``(T, n_q, C, H, W)``, ``(T, n_q)``; every task has the same ``n_way`` (given, else
        ``max label + 1``, which costs a device sync)."""
        if n_way is None:
            n_way = _batch_n_way(support_labels, query_labels)
        sx, qx = self._embed_tasks(support_images), self._embed_tasks(query_images)

        def task(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> tuple[Tensor, Tensor]:
            return self.task_loss(sx, sy, qx, qy, n_way)

        losses, accs = vmap(task)(sx, support_labels, qx, query_labels)
        return losses.mean(), accs.mean().detach()

    def _embed_tasks(self, images: Tensor) -> Tensor:
        """``(T, n, C, H, W)`` -> ``(T, n, *feature_shape)`` in one backbone call (ANIL)."""
        if not self.anil:
            return images
        t, n = images.shape[:2]
        return self.embed(images.flatten(0, 1)).unflatten(0, (t, n))

    def config(self) -> dict[str, Any]:
        return {"inner_steps": self.inner_steps, "inner_lr": self.inner_lr,
                "first_order": self.first_order, "meta_sgd": self.meta_sgd,
                "anil": self.anil, "pool": self.pool,
                "test_inner_steps": self.test_inner_steps, "query_norm": self.query_norm,
                **({"normalize": True, "scale": self.scale} if self.normalize else {})}


def _batch_n_way(support_labels: Tensor, query_labels: Tensor) -> int:
    """``max label + 1`` over a task batch's ``(T, n_s)`` and ``(T, n_q)`` labels."""
    return int(torch.maximum(support_labels.max(), query_labels.max()).item()) + 1


def meta_loss_loop(model: MAMLClassifier, support_images: Tensor, support_labels: Tensor,
                   query_images: Tensor, query_labels: Tensor,
                   n_way: int | None = None) -> tuple[Tensor, Tensor]:
    """:meth:`MAMLClassifier.meta_loss` without ``vmap``: the same :meth:`task_loss`, one task
    at a time in a Python loop (the baseline ``benchmarks/train_speed.py`` times)."""
    if n_way is None:
        n_way = _batch_n_way(support_labels, query_labels)
    sx, qx = model._embed_tasks(support_images), model._embed_tasks(query_images)
    losses, accs = zip(*(model.task_loss(s, sy, q, qy, n_way) for s, sy, q, qy
                         in zip(sx, support_labels, qx, query_labels, strict=True)), strict=True)
    return torch.stack(losses).mean(), torch.stack(accs).mean().detach()
