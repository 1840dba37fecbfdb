"""The one MAML inner loop (Finn et al. 2017; first order; Meta-SGD's learnable per-parameter
rates, Li et al. 2017), with a learn2learn-style face.

:class:`MAMLLearner` holds fast weights and a function of them; :meth:`MAMLLearner.adapt`
takes one SGD step ``w' = w - lr_w * dL/dw`` with ``torch.func.grad``, so the same code runs
for one task and, under ``torch.func.vmap``, for a batch of tasks. Second order (default):
the step is differentiable, a meta-gradient flows through it; first order: the gradient is a
constant. The few-shot method :class:`~fewshot_studio.models.maml.MAMLClassifier` adapts
with it (its forward: the network with a Proto-MAML head); :class:`MAML` wraps any module::

    maml = MAML(net, lr=0.1)
    learner = maml.clone()
    learner.adapt(lambda l: F.cross_entropy(l(support_x), support_y))
    F.cross_entropy(learner(query_x), query_y).backward()   # meta-gradient in net

Unlike learn2learn, ``adapt`` takes the support loss as a function of the learner rather
than a computed loss: what lets ``vmap`` run it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad

Params = dict[str, Tensor]
Rates = float | Tensor | Mapping[str, float | Tensor]
Forward = Callable[..., Tensor]  # (params, *inputs) -> output


def _key(name: str) -> str:
    """A parameter name as a ParameterDict key (dots are not allowed there)."""
    return name.replace(".", "__")


def _rate(lr: Rates, name: str) -> float | Tensor:
    return lr[name] if isinstance(lr, Mapping) else lr


class MAMLLearner:
    """Fast weights ``params`` being adapted, and ``forward(params, *inputs)``; calling the
    learner runs ``forward`` with the current weights.

    ``adapted``: the names in ``params`` the inner loop changes (the others are held fixed:
    partial derivatives, even when one was computed from another); ``lr``: the inner rate, a
    number, or name -> tensor broadcastable to that weight (Meta-SGD); ``first_order``:
    FOMAML."""

    def __init__(self, forward: Forward, params: Params, adapted: Sequence[str], lr: Rates,
                 first_order: bool = False) -> None:
        self.forward = forward
        self.params = params
        self.adapted = list(adapted)
        self.lr = lr
        self.first_order = first_order

    def __call__(self, *inputs: Any) -> Tensor:
        return self.forward(self.params, *inputs)

    def adapt(self, loss: Callable[[MAMLLearner], Tensor],
              first_order: bool | None = None) -> MAMLLearner:
        """One inner step on ``loss(learner)``, the (support) loss computed with a learner;
        updates ``params`` and returns ``self``. Runs under ``torch.func.vmap`` and under
        ``torch.no_grad()`` (then nothing is differentiable)."""
        fo = self.first_order if first_order is None else first_order
        fixed = {n: v for n, v in self.params.items() if n not in self.adapted}

        def loss_of(point: Params) -> Tensor:
            return loss(MAMLLearner(self.forward, {**fixed, **point}, (), self.lr))

        point = {n: self.params[n] for n in self.adapted}
        # first order: outside autograd's view the gradient is a constant
        with torch.no_grad() if fo else contextlib.nullcontext():
            g = grad(loss_of)(point)
        self.params = {**self.params,
                       **{n: self.params[n] - _rate(self.lr, n) * g[n] for n in self.adapted}}
        return self


class MAML(nn.Module):
    """learn2learn-style MAML around a module.

    ``lr``: the inner learning rate (Meta-SGD: the initial value of the learnable
    per-parameter rates, one tensor of each parameter's shape, in ``self.lrs``);
    ``first_order``: FOMAML; ``adapt``: predicate on parameter names choosing which ones
    the inner loop adapts (default all)."""

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
        flows back into the wrapped module's parameters and the Meta-SGD rates)."""
        def forward(params: Params, *inputs: Any) -> Tensor:
            return functional_call(self.module, params, inputs)

        return MAMLLearner(forward, dict(self.module.named_parameters()),
                           self.adapted_names(), self.rates(), self.first_order)

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        return self.module(*args, **kwargs)
