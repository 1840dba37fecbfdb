"""The one MAML inner loop (``maml_core.MAMLLearner``, what ``MAMLClassifier`` adapts with)
against explicit formulas and hand-written autograd, through its learn2learn face and through
the shipped classifier; the classifier's vectorised (torch.func) meta-loss against a
hand-written per-task autograd reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from maml_fixtures import DT, Pixels, image_tasks, small_maml
from torch import Tensor, nn

from fewshot_studio.models import build_model, model_spec
from fewshot_studio.models.maml import MAML, MAMLClassifier, meta_loss_loop


def _mse(out: Tensor, target: Tensor) -> Tensor:
    return ((out - target) ** 2).mean()


# -- the learner (learn2learn face) against closed forms (linear regression) -----------------

def _linear_task(g: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    xs, xq = torch.randn(5, 3, generator=g, dtype=DT), torch.randn(4, 3, generator=g, dtype=DT)
    ys, yq = torch.randn(5, 1, generator=g, dtype=DT), torch.randn(4, 1, generator=g, dtype=DT)
    return xs, ys, xq, yq


@pytest.mark.parametrize("first_order", [False, True])
def test_inner_step_and_meta_gradient_closed_form(first_order: bool) -> None:
    """f(x) = x.w, MSE. Inner step w' = w - a (2/n) Xs^T (Xs w - ys); meta-gradient
    (I - a H_s) grad L_q(w') with H_s = (2/n) Xs^T Xs, or grad L_q(w') for first order."""
    g = torch.Generator().manual_seed(0)
    xs, ys, xq, yq = _linear_task(g)
    net = nn.Linear(3, 1, bias=False).to(DT)
    alpha = 0.3
    maml = MAML(net, lr=alpha, first_order=first_order)
    learner = maml.clone()
    learner.adapt(lambda lr: _mse(lr(xs), ys))
    loss = _mse(learner(xq), yq)
    loss.backward()

    w = net.weight.detach().reshape(3, 1)
    grad_s = 2 / 5 * xs.t() @ (xs @ w - ys)
    w1 = w - alpha * grad_s
    assert torch.allclose(learner.params["weight"].reshape(3, 1), w1, atol=1e-12)
    grad_q = 2 / 4 * xq.t() @ (xq @ w1 - yq)
    h_s = 2 / 5 * xs.t() @ xs
    expected = grad_q if first_order else (torch.eye(3, dtype=DT) - alpha * h_s) @ grad_q
    assert torch.allclose(net.weight.grad.reshape(3, 1), expected, atol=1e-12)
    assert loss.item() == pytest.approx(float(((xq @ w1 - yq) ** 2).mean()), abs=1e-12)


@pytest.mark.parametrize("first_order", [False, True])
def test_meta_sgd_closed_form(first_order: bool) -> None:
    """Meta-SGD, w' = w - a * g (a per parameter): dL/da = -g * grad L_q(w');
    dL/dw = (I - H_s diag(a)) grad L_q(w') (second order) or grad L_q(w')."""
    g = torch.Generator().manual_seed(1)
    xs, ys, xq, yq = _linear_task(g)
    net = nn.Linear(3, 1, bias=False).to(DT)
    maml = MAML(net, lr=0.2, first_order=first_order, meta_sgd=True).to(DT)
    with torch.no_grad():
        maml.lrs["weight"].copy_(torch.tensor([[0.1, 0.2, 0.3]], dtype=DT))
    learner = maml.clone()
    learner.adapt(lambda lr: _mse(lr(xs), ys))
    _mse(learner(xq), yq).backward()

    w = net.weight.detach().reshape(3, 1)
    a = torch.tensor([[0.1], [0.2], [0.3]], dtype=DT)
    grad_s = 2 / 5 * xs.t() @ (xs @ w - ys)
    w1 = w - a * grad_s
    grad_q = 2 / 4 * xq.t() @ (xq @ w1 - yq)
    h_s = 2 / 5 * xs.t() @ xs
    assert torch.allclose(maml.lrs["weight"].grad.reshape(3, 1), -grad_s * grad_q, atol=1e-12)
    expected = grad_q if first_order else (torch.eye(3, dtype=DT) - h_s @ torch.diag(a[:, 0])) \
        @ grad_q
    assert torch.allclose(net.weight.grad.reshape(3, 1), expected, atol=1e-12)


# -- the wrapper against hand-written functional code (tiny MLP) ----------------------------

def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4)).to(DT)


def _mlp_forward(p: list[Tensor], x: Tensor) -> Tensor:
    w1, b1, w2, b2 = p
    return torch.tanh(x @ w1.t() + b1) @ w2.t() + b2


def _classification_tasks(t: int, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    sx = torch.randn(t, 8, 3, generator=g, dtype=DT)
    qx = torch.randn(t, 6, 3, generator=g, dtype=DT)
    sy = torch.randint(0, 4, (t, 8), generator=g)
    qy = torch.randint(0, 4, (t, 6), generator=g)
    return sx, sy, qx, qy


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("steps", [1, 2])
def test_wrapper_matches_hand_written_reference(first_order: bool, steps: int) -> None:
    net = _mlp()
    alpha = 0.5
    sx, sy, qx, qy = (a[0] for a in _classification_tasks(1))
    # reference: explicit functional MLP, torch.autograd.grad on it
    p0 = [q.detach().clone().requires_grad_(True) for q in net.parameters()]
    p = p0
    for _ in range(steps):
        grads = torch.autograd.grad(F.cross_entropy(_mlp_forward(p, sx), sy), p,
                                    create_graph=not first_order)
        p = [pi - alpha * gi for pi, gi in zip(p, grads, strict=True)]
    ref_loss = F.cross_entropy(_mlp_forward(p, qx), qy)
    ref_grads = torch.autograd.grad(ref_loss, p0)

    maml = MAML(net, lr=alpha, first_order=first_order)
    learner = maml.clone()
    for _ in range(steps):
        learner.adapt(lambda lr: F.cross_entropy(lr(sx), sy))
    for mine, ref in zip(learner.params.values(), p, strict=True):
        assert torch.allclose(mine, ref, atol=1e-12)
    loss = F.cross_entropy(learner(qx), qy)
    loss.backward()
    assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-12)
    for q, ref in zip(net.parameters(), ref_grads, strict=True):
        assert torch.allclose(q.grad, ref, atol=1e-10)
    if not first_order:  # second order really differs from first order here
        fo = [pi - alpha * gi.detach() for pi, gi in zip(p0, torch.autograd.grad(
            F.cross_entropy(_mlp_forward(p0, sx), sy), p0), strict=True)]
        fo_grads = torch.autograd.grad(F.cross_entropy(_mlp_forward(fo, qx), qy), p0)
        if steps == 1:
            assert max((a - b).abs().max() for a, b in zip(fo_grads, ref_grads,
                                                           strict=True)) > 1e-4


@pytest.mark.parametrize(("first_order", "meta_sgd"),
                         [(False, False), (True, False), (False, True), (True, True)])
def test_learner_under_vmap_equals_loop(first_order: bool, meta_sgd: bool) -> None:
    """The learner vectorised over tasks with torch.func.vmap (as the classifier's meta-loss
    runs it) gives the per-task loop's loss and meta-gradients."""
    net = _mlp()
    maml = MAML(net, lr=0.4, first_order=first_order, meta_sgd=meta_sgd,
                adapt=lambda name: not name.startswith("0.")
                if meta_sgd else True).to(DT)
    sx, sy, qx, qy = _classification_tasks(4)
    params = list(maml.parameters())

    def task(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> Tensor:
        learner = maml.clone()
        for _ in range(2):
            learner.adapt(lambda lr: F.cross_entropy(lr(sx), sy))
        return F.cross_entropy(learner(qx), qy)

    vec = torch.func.vmap(task)(sx, sy, qx, qy).mean()
    g_vec = torch.autograd.grad(vec, params, allow_unused=True)
    loop = torch.stack([task(sx[t], sy[t], qx[t], qy[t]) for t in range(4)]).mean()
    g_loop = torch.autograd.grad(loop, params, allow_unused=True)
    assert vec.item() == pytest.approx(loop.item(), abs=1e-12)
    for a, b in zip(g_vec, g_loop, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.allclose(a, b, atol=1e-10)


# -- the shipped classifier against closed forms and hand-written autograd ------------------

@pytest.mark.parametrize("first_order", [False, True])
def test_classifier_anil_step_and_meta_sgd_gradient_closed_form(first_order: bool) -> None:
    """ANIL on fixed features X: Proto-MAML head W = 2c, b = -|c|^2; one step
    W' = W - a_W (P - Y)^T X / n, b' = b - a_b mean(P - Y); the query loss's gradient with
    respect to the Meta-SGD rates is -sum_k g_k h_k (h: the query loss's gradient at W', b'),
    in both orders (nothing else is meta-learnt here)."""
    g = torch.Generator().manual_seed(4)
    xs, xq = torch.randn(6, 4, generator=g, dtype=DT), torch.randn(9, 4, generator=g, dtype=DT)
    ys, yq = torch.tensor([0, 1, 2, 0, 1, 2]), torch.arange(3).repeat(3)
    bb = Pixels()
    bb.feature_shape = (4,)
    model = MAMLClassifier(bb, inner_steps=1, anil=True, meta_sgd=True,
                           first_order=first_order).to(DT).train()
    a_w = torch.tensor([[0.1, 0.2, 0.3, 0.4]], dtype=DT)
    with torch.no_grad():
        model.inner_lrs["head__weight"].copy_(a_w)
        model.inner_lrs["head__bias"].fill_(0.25)
    loss, _ = model.meta_loss(xs[None], ys[None], xq[None], yq[None], 3)
    loss.backward()

    y_s, y_q = F.one_hot(ys, 3).to(DT), F.one_hot(yq, 3).to(DT)
    c = (y_s.t() @ xs) / y_s.sum(0)[:, None]
    w, b = 2 * c, -(c ** 2).sum(1)
    err = (xs @ w.t() + b).softmax(-1) - y_s
    g_w, g_b = err.t() @ xs / 6, err.mean(0)
    w1, b1 = w - a_w * g_w, b - 0.25 * g_b
    logits = xq @ w1.t() + b1
    assert loss.item() == pytest.approx(F.cross_entropy(logits, yq).item(), abs=1e-12)
    err_q = logits.softmax(-1) - y_q
    h_w, h_b = err_q.t() @ xq / 9, err_q.mean(0)
    torch.testing.assert_close(model.inner_lrs["head__weight"].grad,
                               -(g_w * h_w).sum(0, keepdim=True), atol=1e-12, rtol=0)
    torch.testing.assert_close(model.inner_lrs["head__bias"].grad,
                               -(g_b * h_b).sum().reshape(1), atol=1e-12, rtol=0)


class _MLPBackbone(nn.Module):
    """Linear(3, 5) -> tanh -> Linear(5, 4): ``(n, 3)`` -> ``(n, 4)`` features."""

    feature_shape = (4,)

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def _hand_written_maml(p0: list[Tensor], sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor,
                       alpha: float, steps: int, first_order: bool) -> Tensor:
    """Full MAML with a Proto-MAML head on the MLP, written out: ``torch.autograd.grad`` on
    explicit formulas, partial derivatives (every fast weight a variable of its own)."""
    feats = _mlp_forward(p0, sx)
    c = torch.stack([feats[sy == k].mean(0) for k in range(4)])
    fast = [*p0, 2 * c, -(c ** 2).sum(1)]
    for _ in range(steps):
        fast = [v.view_as(v) for v in fast]
        loss = F.cross_entropy(_mlp_forward(fast[:4], sx) @ fast[4].t() + fast[5], sy)
        grads = torch.autograd.grad(loss, fast, create_graph=not first_order)
        fast = [v - alpha * gv for v, gv in zip(fast, grads, strict=True)]
    return F.cross_entropy(_mlp_forward(fast[:4], qx) @ fast[4].t() + fast[5], qy)


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("steps", [1, 2])
def test_classifier_matches_hand_written_maml(first_order: bool, steps: int) -> None:
    """The shipped classifier (full MAML, Proto-MAML head) on a tiny MLP: its vectorised
    meta-loss, the per-task loop and fit() in training mode all give the hand-written
    reference's loss and meta-gradients."""
    model = MAMLClassifier(_MLPBackbone(), inner_steps=steps, inner_lr=0.5,
                           first_order=first_order).to(DT).train()
    sx, sy, qx, qy = _classification_tasks(2, seed=7)
    sy = torch.arange(4).repeat(2).expand(2, -1)  # every class in every support set
    params = list(model.parameters())
    losses = [_hand_written_maml(params, sx[t], sy[t], qx[t], qy[t], 0.5, steps, first_order)
              for t in range(2)]
    ref = torch.stack(losses).mean()
    g_ref = torch.autograd.grad(ref, params)
    fit_loss = torch.stack([model.loss(model(sx[t], sy[t], qx[t], 4), qy[t])
                            for t in range(2)]).mean()
    for loss in (model.meta_loss(sx, sy, qx, qy, 4)[0],
                 meta_loss_loop(model, sx, sy, qx, qy)[0], fit_loss):
        assert loss.item() == pytest.approx(ref.item(), abs=1e-12)
        for a, b in zip(torch.autograd.grad(loss, params), g_ref, strict=True):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


# -- the vectorised meta-loss of the classifier -------------------------------------------

def _reference_meta_loss(model: MAMLClassifier, sx: Tensor, sy: Tensor, qx: Tensor,
                         qy: Tensor, n_way: int) -> tuple[Tensor, Tensor]:
    """The meta-loss written out one task at a time with ``torch.autograd.grad`` (the shipped
    inner loop uses ``torch.func.grad``): partial derivatives through fresh views, the
    gradient a constant for first order; adapts (and detaches) under ``no_grad`` too."""
    if not torch.is_grad_enabled():
        with torch.enable_grad():
            loss, acc = _reference_meta_loss(model, sx, sy, qx, qy, n_way)
        return loss.detach(), acc
    steps = model.inner_steps if model.training else model.test_inner_steps
    rates = model.rates()
    losses, accs = [], []
    sx, qx = model._embed_tasks(sx), model._embed_tasks(qx)  # ANIL: one backbone call each
    for s, y, q, yq in zip(sx, sy, qx, qy, strict=True):
        weights = model.init_weights(s, y, n_way)
        names = [n for n in weights if not model.anil or n.startswith("head.")]
        for _ in range(steps):
            weights = {n: (v.view_as(v) if n in names else v) for n, v in weights.items()}
            loss = F.cross_entropy(model.logits(weights, s), y)
            grads = torch.autograd.grad(loss, [weights[n] for n in names], retain_graph=True,
                                        create_graph=not model.first_order)
            for n, gn in zip(names, grads, strict=True):
                weights[n] = weights[n] - (rates[n] if isinstance(rates, dict) else rates) * gn
        logits = model.logits(weights, q)
        losses.append(F.cross_entropy(logits, yq))
        accs.append((logits.argmax(-1) == yq).float().mean())
    return torch.stack(losses).mean(), torch.stack(accs).mean().detach()


@pytest.mark.parametrize("kw", [
    {},
    {"first_order": True},
    {"meta_sgd": True},
    {"meta_sgd": True, "first_order": True},
    {"anil": True},
    {"anil": True, "meta_sgd": True},
    {"anil": True, "first_order": True},
    {"normalize": True, "meta_sgd": True, "first_order": True},
], ids=lambda kw: "-".join(kw) or "second-order")
def test_vectorised_meta_loss_equals_hand_written_loop(kw: dict) -> None:
    """Conv4 with batch statistics (BatchStatNorm2d under vmap) and every option: the
    vectorised meta-loss against the autograd reference, values and meta-gradients."""
    model = small_maml(inner_steps=2, inner_lr=0.1, **kw).train()
    tasks = image_tasks(3, 3, 2, 2)
    params = [p for p in model.parameters() if p.requires_grad]
    loss_v, acc_v = model.meta_loss(*tasks)
    g_v = torch.autograd.grad(loss_v, params, allow_unused=True)
    loss_l, acc_l = _reference_meta_loss(model, *tasks, 3)
    g_l = torch.autograd.grad(loss_l, params, allow_unused=True)
    assert loss_v.item() == pytest.approx(loss_l.item(), abs=1e-10)
    assert acc_v.item() == pytest.approx(acc_l.item())
    n_checked = 0
    for (name, _), a, b in zip(model.named_parameters(), g_v, g_l, strict=True):
        assert (a is None) == (b is None), name
        if a is not None:
            assert torch.allclose(a, b, atol=1e-9, rtol=1e-7), name
            n_checked += 1
    assert n_checked >= 10
    if kw.get("meta_sgd"):
        assert any(n.startswith("inner_lrs.") for n, _ in model.named_parameters())


def test_base_forward_loop_equals_vectorised() -> None:
    """The generic FewShotClassifier path (forward = embed + fit + predictor) computes the
    same training loss as the vectorised meta-loss."""
    model = small_maml(inner_steps=1, inner_lr=0.2).train()
    tasks = image_tasks(2, 3, 1, 2, seed=3)
    generic, _ = super(MAMLClassifier, model).meta_loss(*tasks)
    vec, _ = model.meta_loss(*tasks)
    assert generic.item() == pytest.approx(vec.item(), abs=1e-10)


def test_eval_meta_loss_under_no_grad() -> None:
    """Validation: both paths run under no_grad in eval mode (test_inner_steps) and agree."""
    model = small_maml(inner_steps=1, test_inner_steps=3, inner_lr=0.2).eval()
    tasks = image_tasks(2, 4, 1, 2, seed=5)
    with torch.no_grad():
        loss_v, acc_v = model.meta_loss(*tasks)
        loss_l, acc_l = _reference_meta_loss(model, *tasks, 4)
    assert not loss_v.requires_grad and not loss_l.requires_grad
    assert loss_v.item() == pytest.approx(loss_l.item(), abs=1e-10)
    assert acc_v.item() == pytest.approx(acc_l.item())
    # and fit() with the same number of steps gives the same query loss on task 0 when its
    # predictor normalises queries as meta_loss does (query-batch statistics)
    sx, sy, qx, qy = (a[0] for a in tasks)
    model.query_norm = "batch"
    with torch.no_grad():
        logits = model.fit(model.embed(sx), sy, 4)(model.embed(qx))
    with torch.no_grad():
        single, _ = meta_loss_loop(model, *(a[:1] for a in tasks))
    assert F.cross_entropy(logits, qy).item() == pytest.approx(single.item(), abs=1e-10)


@pytest.mark.parametrize("anil", [False, True])
def test_normalized_vectorised_equals_loop_and_scale_trains(anil: bool) -> None:
    model = small_maml(inner_steps=2, inner_lr=0.1, anil=anil, normalize=True,
                       meta_sgd=True).train()
    tasks = image_tasks(2, 3, 2, 2)
    loss_v, _ = model.meta_loss(*tasks)
    loss_l, _ = _reference_meta_loss(model, *tasks, 3)
    assert loss_v.item() == pytest.approx(loss_l.item(), abs=1e-10)
    (g,) = torch.autograd.grad(loss_v, [model.feature_scale])
    (g_l,) = torch.autograd.grad(loss_l, [model.feature_scale])
    assert g.abs() > 0 and torch.allclose(g, g_l, atol=1e-9)
    spec = model_spec(model, "conv4", model.backbone.config())
    rebuilt = build_model(spec)
    assert rebuilt.config() == model.config() and rebuilt.config()["normalize"] is True
    rebuilt.load_state_dict(model.state_dict())  # the trained scale included
