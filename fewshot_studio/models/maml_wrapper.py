"""A learn2learn-style MAML wrapper around any module (Finn et al. 2017; first order;
Meta-SGD's learnable per-parameter rates, Li et al. 2017): ``learner = maml.clone()``,
``learner.adapt(loss)`` (one differentiable SGD step; second order through ``create_graph=True``
unless ``first_order``), ``learner(x)``; and :meth:`MAML.meta_loss`, the same algorithm
vectorised over a task batch with ``torch.func`` (``functional_call``, ``grad``, ``vmap``).
The few-shot method built on it is :mod:`fewshot_studio.models.maml`."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

Params = dict[str, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]
Rates = float | Tensor | Mapping[str, float | Tensor]


def _key(name: str) -> str:
    """A parameter name as a ParameterDict key (dots are not allowed there)."""
    return name.replace(".", "__")


def _rate(lr: Rates, name: str) -> float | Tensor:
    return lr[name] if isinstance(lr, Mapping) else lr


def sgd_step(loss: Tensor, params: Mapping[str, Tensor], lr: Rates,
             names: Iterable[str] | None = None, first_order: bool = False) -> Params:
    """One inner-loop step ``p' = p - lr_p * dloss/dp`` with ``torch.autograd.grad``.

    ``names``: the parameters to adapt (default all; those not requiring grad are skipped).
    Second order (default) keeps the graph of the gradient (``create_graph=True``) so that a
    meta-gradient flows through it; ``first_order`` treats the gradient as a constant. ``lr``
    is a number, a tensor, or a mapping name -> rate (Meta-SGD: tensors broadcastable to the
    parameter). Gradients are taken with respect to the given tensors: if one was computed
    from another, pass views (``v.view_as(v)``) made before computing ``loss`` to get partial
    derivatives. Returns a new dict; the inputs are not modified.
    """
    names = [n for n in (params if names is None else names) if params[n].requires_grad]
    out = dict(params)
    if not names:
        return out
    # retain_graph: the outer (meta) graph, e.g. a head initialised from features, is shared
    grads = torch.autograd.grad(loss, [params[n] for n in names], retain_graph=True,
                                create_graph=not first_order, allow_unused=True)
    for n, g in zip(names, grads, strict=True):
        if g is not None:
            out[n] = params[n] - _rate(lr, n) * g
    return out


class MAMLLearner:
    """A clone of a :class:`MAML`-wrapped module whose weights (``params``) adapt.

    Calling it runs the wrapped module with the current fast weights
    (``torch.func.functional_call``); :meth:`adapt` takes one SGD step on a loss.
    """

    def __init__(self, maml: MAML, params: Params) -> None:
        self.maml = maml
        self.params = params

    def __call__(self, *args: Any, **kwargs: Any) -> Tensor:
        return functional_call(self.maml.module, self.params, args, kwargs, strict=False)

    def adapt(self, loss: Tensor, first_order: bool | None = None) -> MAMLLearner:
        """One inner step on ``loss`` (computed with this learner); returns ``self``."""
        fo = self.maml.first_order if first_order is None else first_order
        self.params = sgd_step(loss, self.params, self.maml.rates(),
                               self.maml.adapted_names(), first_order=fo)
        return self


class MAML(nn.Module):
    """learn2learn-style MAML wrapper.

    ``lr``: the inner learning rate (Meta-SGD: the initial value of the learnable
    per-parameter rates, one tensor of each parameter's shape, in ``self.lrs``);
    ``first_order``: FOMAML; ``adapt``: predicate on parameter names choosing which ones
    the inner loop adapts (default all).

    >>> maml = MAML(net, lr=0.1)
    >>> learner = maml.clone()
    >>> learner.adapt(F.cross_entropy(learner(support_x), support_y))
    >>> F.cross_entropy(learner(query_x), query_y).backward()   # meta-gradient in net
    """

    def __init__(self, module: nn.Module, lr: float = 0.4, first_order: bool = False,
                 meta_sgd: bool = False, adapt: Callable[[str], bool] | None = None) -> None:
        super().__init__()
        self.module = module
        self.lr = float(lr)
        self.first_order = first_order
        self.meta_sgd = meta_sgd
        self._adapt = adapt or (lambda _name: True)
        self.lrs = nn.ParameterDict()
        if meta_sgd:
            for n in self.adapted_names():
                p = self.module.get_parameter(n)
                self.lrs[_key(n)] = nn.Parameter(torch.full_like(p.detach(), self.lr))

    def adapted_names(self) -> list[str]:
        """Names of the parameters the inner loop adapts."""
        return [n for n, _ in self.module.named_parameters() if self._adapt(n)]

    def rates(self) -> Rates:
        """The inner learning rate(s): a float, or name -> tensor with Meta-SGD."""
        if not self.meta_sgd:
            return self.lr
        return {n: self.lrs[_key(n)] for n in self.adapted_names()}

    def clone(self) -> MAMLLearner:
        """A learner starting from the current weights (differentiably: a meta-gradient
        flows back into the wrapped module's parameters)."""
        return MAMLLearner(self, dict(self.module.named_parameters()))

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        return self.module(*args, **kwargs)

    def meta_loss(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor,
                  steps: int = 1, loss_fn: LossFn = F.cross_entropy) -> Tensor:
        """Mean query loss after ``steps`` inner steps, vectorised over the task batch
        (``torch.func.vmap`` over dim 0 of every input, ``torch.func.grad`` inside).

        Shapes: ``(T, n_s, ...)``, ``(T, n_s, ...)``, ``(T, n_q, ...)``, ``(T, n_q, ...)``.
        Equals averaging ``clone()``/``adapt()`` over the tasks, in both gradient orders.
        The wrapped module must not update buffers (e.g. BatchNorm running statistics)
        in the mode it is called in.
        """
        params = dict(self.module.named_parameters())
        names = self.adapted_names()
        rates = self.rates()
        first_order = self.first_order

        def task(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> Tensor:
            fast = dict(params)
            for _ in range(steps):
                # first order: the gradient is a constant, so evaluate it on detached inputs
                base = {n: v.detach() for n, v in fast.items()} if first_order else fast
                point = {n: base[n] for n in names}

                def inner(a: Params, base: Params = base, sx: Tensor = sx,
                          sy: Tensor = sy) -> Tensor:
                    return loss_fn(functional_call(self.module, {**base, **a}, (sx,)), sy)

                g = grad(inner)(point)
                fast = {**fast, **{n: fast[n] - _rate(rates, n) * g[n] for n in names}}
            return loss_fn(functional_call(self.module, fast, (qx,)), qy)

        return vmap(task)(support_x, support_y, query_x, query_y).mean()


# -- the few-shot method ---------------------------------------------------------------------

def use_vmap_safe_norms(module: nn.Module) -> int:
    """Replace, in place, every affine ``nn.BatchNorm2d(track_running_stats=False)`` inside
    ``module`` by the equivalent :class:`BatchStatNorm2d` (same parameter names and values),
    whose second-order gradients under ``torch.func.vmap`` are exact. Returns the count."""
    from fewshot_studio.models.backbones.conv4 import BatchStatNorm2d

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
