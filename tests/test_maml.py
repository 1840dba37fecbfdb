"""MAML: the wrapper's inner step and meta-gradient against explicit formulas and hand-written
autograd; the vectorised (torch.func) meta-loss against the per-task loop; Proto-MAML heads for
any number of classes; ANIL transductive refinement."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewshot_studio.data.scan import scan_images
from fewshot_studio.models import METHODS, build_model, create_backbone, model_spec
from fewshot_studio.models import functional as Fn
from fewshot_studio.models.backbones.conv4 import BatchStatNorm2d
from fewshot_studio.models.maml import (
    MAML,
    MAMLClassifier,
    meta_loss_loop,
    proto_head,
    use_vmap_safe_norms,
)
from fewshot_studio.models.protonet import ProtoNet

DT = torch.float64


def _mse(out: Tensor, target: Tensor) -> Tensor:
    return ((out - target) ** 2).mean()


# -- the wrapper against closed forms (linear regression) ------------------------------------

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
    learner.adapt(_mse(learner(xs), ys))
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
    learner.adapt(_mse(learner(xs), ys))
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
        learner.adapt(F.cross_entropy(learner(sx), sy))
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
def test_wrapper_vectorised_meta_loss_equals_loop(first_order: bool, meta_sgd: bool) -> None:
    net = _mlp()
    maml = MAML(net, lr=0.4, first_order=first_order, meta_sgd=meta_sgd,
                adapt=lambda name: not name.startswith("0.")
                if meta_sgd else True).to(DT)
    sx, sy, qx, qy = _classification_tasks(4)
    params = list(maml.parameters())
    vec = maml.meta_loss(sx, sy, qx, qy, steps=2)
    g_vec = torch.autograd.grad(vec, params, allow_unused=True)
    losses = []
    for t in range(4):
        learner = maml.clone()
        for _ in range(2):
            learner.adapt(F.cross_entropy(learner(sx[t]), sy[t]))
        losses.append(F.cross_entropy(learner(qx[t]), qy[t]))
    loop = torch.stack(losses).mean()
    g_loop = torch.autograd.grad(loop, params, allow_unused=True)
    assert vec.item() == pytest.approx(loop.item(), abs=1e-12)
    for a, b in zip(g_vec, g_loop, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.allclose(a, b, atol=1e-10)


# -- the few-shot method -------------------------------------------------------------------

def _maml(**kw: object) -> MAMLClassifier:
    torch.manual_seed(0)
    anil = bool(kw.get("anil", False))
    bb = create_backbone("conv4", in_channels=1, image_size=14, hidden=8, pool_layers=3,
                         track_running_stats=anil)
    return MAMLClassifier(bb, **kw).to(DT)  # type: ignore[arg-type]


def _image_tasks(t: int, n_way: int, shots: int, queries: int,
                 seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    sx = torch.randn(t, n_way * shots, 1, 14, 14, generator=g, dtype=DT)
    qx = torch.randn(t, n_way * queries, 1, 14, 14, generator=g, dtype=DT)
    sy = torch.arange(n_way).repeat(shots).expand(t, -1)
    qy = torch.arange(n_way).repeat(queries).expand(t, -1)
    return sx, sy, qx, qy


@pytest.mark.parametrize("kw", [
    {},
    {"first_order": True},
    {"meta_sgd": True},
    {"meta_sgd": True, "first_order": True},
    {"anil": True},
    {"anil": True, "meta_sgd": True},
    {"anil": True, "first_order": True},
], ids=lambda kw: "-".join(kw) or "second-order")
def test_vectorised_meta_loss_equals_per_task_loop(kw: dict) -> None:
    model = _maml(inner_steps=2, inner_lr=0.1, **kw).train()
    tasks = _image_tasks(3, 3, 2, 2)
    params = [p for p in model.parameters() if p.requires_grad]
    loss_v, acc_v = model.meta_loss(*tasks)
    g_v = torch.autograd.grad(loss_v, params, allow_unused=True)
    loss_l, acc_l = meta_loss_loop(model, *tasks)
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
    model = _maml(inner_steps=1, inner_lr=0.2).train()
    tasks = _image_tasks(2, 3, 1, 2, seed=3)
    generic, _ = super(MAMLClassifier, model).meta_loss(*tasks)
    vec, _ = model.meta_loss(*tasks)
    assert generic.item() == pytest.approx(vec.item(), abs=1e-10)


def test_proto_head_starts_as_protonet() -> None:
    """Before adaptation the Proto-MAML head scores like ProtoNet (same softmax)."""
    model = _maml(inner_steps=0, anil=True).eval()
    proto = ProtoNet(model.backbone).eval()
    sx, sy, qx, _ = (a[0] for a in _image_tasks(1, 4, 2, 3))
    with torch.no_grad():
        p_maml = model(sx, sy, qx).softmax(-1)
        p_proto = proto(sx, sy, qx).softmax(-1)
    assert torch.allclose(p_maml, p_proto, atol=1e-10)
    head = proto_head(torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]]),
                      torch.tensor([0, 0, 1]), 2)
    assert torch.equal(head["head.weight"], torch.tensor([[4.0, 0.0], [0.0, 4.0]]))
    assert torch.equal(head["head.bias"], torch.tensor([-4.0, -4.0]))


@pytest.mark.parametrize("anil", [False, True])
@pytest.mark.parametrize(("n_way", "shots"), [(2, [1, 3]), (7, [2, 1, 1, 3, 1, 2, 1])])
def test_any_n_way_fit_under_no_grad(anil: bool, n_way: int, shots: list[int]) -> None:
    model = _maml(inner_steps=1, test_inner_steps=5, inner_lr=0.5, anil=anil).eval()
    g = torch.Generator().manual_seed(n_way)
    labels = torch.cat([torch.full((k,), c) for c, k in enumerate(shots)])
    images = torch.randn(len(labels), 1, 14, 14, generator=g, dtype=DT)
    query = torch.randn(5, 1, 14, 14, generator=g, dtype=DT)
    with torch.no_grad():
        feats = model.embed(torch.cat([images, query]))
        predictor = model.fit(feats[:len(labels)], labels)
        logits = predictor(feats[len(labels):])
        support_logits = predictor(feats[:len(labels)])
    assert logits.shape == (5, n_way)
    assert not logits.requires_grad
    assert predictor.weights["head.weight"].shape[0] == n_way
    # the adapted weights fit their support set better than the initial head
    init = model.init_weights(feats[:len(labels)], labels, n_way)
    with torch.no_grad():
        before = F.cross_entropy(model.logits(init, feats[:len(labels)]), labels)
    after = F.cross_entropy(support_logits, labels)
    assert after < before


def test_fit_keeps_graph_in_training() -> None:
    model = _maml(inner_steps=1).train()
    sx, sy, qx, qy = (a[0] for a in _image_tasks(1, 3, 1, 1))
    logits = model(sx, sy, qx)
    assert logits.requires_grad
    model.loss(logits, qy).backward()
    assert model.backbone.encoder[0][0].weight.grad is not None


def test_embed_identity_for_full_maml_and_features_for_anil() -> None:
    x = torch.randn(3, 1, 14, 14, dtype=DT)
    assert torch.equal(_maml().embed(x), x)
    anil = _maml(anil=True, pool="avg").eval()
    assert anil.embed(x).shape == (3, 8)


def test_config_round_trip_and_errors() -> None:
    assert METHODS.get("maml").factory is MAMLClassifier
    bcfg = {"in_channels": 1, "image_size": 14, "hidden": 8, "pool_layers": 3,
            "track_running_stats": False}
    model = MAMLClassifier(create_backbone("conv4", **bcfg), inner_steps=2, inner_lr=0.3,
                           first_order=True, meta_sgd=True, test_inner_steps=4)
    spec = model_spec(model, "conv4", bcfg)
    rebuilt = build_model(spec)
    assert rebuilt.config() == model.config()
    rebuilt.load_state_dict(model.state_dict())  # meta-SGD rates included
    with pytest.raises(ValueError, match="track_running_stats"):
        MAMLClassifier(create_backbone("conv4", in_channels=1, image_size=28))


def test_batch_stat_norm_equals_native_and_replacement() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 5, dtype=DT, requires_grad=True)
    native = nn.BatchNorm2d(3, track_running_stats=False).to(DT)
    with torch.no_grad():
        native.weight.uniform_(0.5, 1.5)
        native.bias.normal_()
    ours = BatchStatNorm2d(3).to(DT)
    ours.load_state_dict(native.state_dict())
    a, b = native(x), ours(x)
    assert torch.allclose(a, b, atol=1e-12)
    ga = torch.autograd.grad(a.pow(3).sum(), x)[0]
    gb = torch.autograd.grad(b.pow(3).sum(), x)[0]
    assert torch.allclose(ga, gb, atol=1e-10)
    assert torch.allclose(Fn.batch_stat_norm(x, native.weight, native.bias), a, atol=1e-12)
    net = nn.Sequential(nn.Conv2d(1, 3, 3), native)
    assert use_vmap_safe_norms(net) == 1 and isinstance(net[1], BatchStatNorm2d)
    assert torch.equal(net[1].weight, native.weight)


def test_batch_stat_norm_under_vmap_equals_native() -> None:
    """Under torch.func.vmap the elementary-op path runs; it must equal the native op."""
    torch.manual_seed(1)
    x = torch.randn(3, 4, 2, 5, 5, dtype=DT)
    w, b = torch.rand(2, dtype=DT) + 0.5, torch.randn(2, dtype=DT)
    got = torch.func.vmap(lambda xi: Fn.batch_stat_norm(xi, w, b))(x)
    for t in range(3):
        ref = F.batch_norm(x[t], None, None, w, b, training=True)
        assert torch.allclose(got[t], ref, atol=1e-12)


def test_eval_meta_loss_under_no_grad() -> None:
    """Validation: both paths run under no_grad in eval mode (test_inner_steps) and agree."""
    model = _maml(inner_steps=1, test_inner_steps=3, inner_lr=0.2).eval()
    tasks = _image_tasks(2, 4, 1, 2, seed=5)
    with torch.no_grad():
        loss_v, acc_v = model.meta_loss(*tasks)
        loss_l, acc_l = meta_loss_loop(model, *tasks)
    assert not loss_v.requires_grad and not loss_l.requires_grad
    assert loss_v.item() == pytest.approx(loss_l.item(), abs=1e-10)
    assert acc_v.item() == pytest.approx(acc_l.item())
    # and fit() with the same number of steps gives the same query loss on task 0 when its
    # predictor normalises queries as meta_loss does (query-batch statistics)
    sx, sy, qx, qy = (a[0] for a in tasks)
    model.query_norm = "batch"
    with torch.no_grad():
        logits = model.fit(model.embed(sx), sy, 4)(model.embed(qx))
    single, _ = meta_loss_loop(model, *(a[:1] for a in tasks))
    assert F.cross_entropy(logits, qy).item() == pytest.approx(single.item(), abs=1e-10)


@pytest.mark.parametrize("query_norm", ["support", "support+query"])
def test_full_maml_query_prediction_independent_of_batch(query_norm: str) -> None:
    """Eval mode: a query scored alone, in a tiny chunk or in a big batch gets the same
    logits (the engine scores queries in chunks); the "batch" statistics of Finn et al. do
    not have this property."""
    model = _maml(inner_steps=1, test_inner_steps=2, inner_lr=0.3,
                  query_norm=query_norm).eval()
    sx, sy, qx, _ = (a[0] for a in _image_tasks(1, 3, 2, 4, seed=5))
    with torch.no_grad():
        predictor = model.fit(sx, sy, 3)
        batch = predictor(qx)
        alone = torch.cat([predictor(qx[i:i + 1]) for i in range(len(qx))])
        chunks = torch.cat([predictor(qx[:2]), predictor(qx[2:7]), predictor(qx[7:])])
    assert batch.shape == (12, 3)
    torch.testing.assert_close(alone, batch, atol=1e-10, rtol=0)
    torch.testing.assert_close(chunks, batch, atol=1e-10, rtol=0)
    if query_norm == "support":
        # the support set scored this way is the plain forward on the support batch
        torch.testing.assert_close(predictor(sx), model.logits(predictor.weights, sx))
    model.query_norm = "batch"
    with torch.no_grad():
        b_batch = model.fit(sx, sy, 3)(qx)
        b_chunks = torch.cat([predictor(qx[:6]), predictor(qx[6:])])
    assert not torch.allclose(b_batch, b_chunks, atol=1e-6)
    assert model.config()["query_norm"] == "batch"
    with pytest.raises(ValueError, match="query_norm"):
        _maml(query_norm="running")


def test_normalized_head_starts_as_cosine_classifier() -> None:
    """``normalize=True``: features are unit vectors times a trained scale, and before
    adaptation a task scores ``scale * cos(q, c) - scale / 2`` (``c``: the class's mean
    normalised feature), for one shot and for several."""
    model = _maml(inner_steps=0, anil=True, normalize=True, scale=8.0, pool="avg").eval()
    sx, sy, qx, _ = (a[0] for a in _image_tasks(1, 4, 3, 3))
    with torch.no_grad():
        logits = model(sx, sy, qx, n_way=4)
        pooled_q = model.backbone(qx).mean(dim=(-2, -1))
        pooled_s = F.normalize(model.backbone(sx).mean(dim=(-2, -1)), dim=-1)
        expected = 8.0 * Fn.cosine_logits(pooled_q, Fn.prototypes(pooled_s, sy, 4), 1.0) - 4.0
        norms = model.embed(qx).norm(dim=-1)
    assert torch.allclose(logits, expected, atol=1e-10)
    assert torch.allclose(norms, torch.full((12,), 2.0, dtype=DT))


@pytest.mark.parametrize("anil", [False, True])
def test_normalized_vectorised_equals_loop_and_scale_trains(anil: bool) -> None:
    model = _maml(inner_steps=2, inner_lr=0.1, anil=anil, normalize=True, meta_sgd=True).train()
    tasks = _image_tasks(2, 3, 2, 2)
    loss_v, _ = model.meta_loss(*tasks)
    loss_l, _ = meta_loss_loop(model, *tasks)
    assert loss_v.item() == pytest.approx(loss_l.item(), abs=1e-10)
    (g,) = torch.autograd.grad(loss_v, [model.feature_scale])
    (g_l,) = torch.autograd.grad(loss_l, [model.feature_scale])
    assert g.abs() > 0 and torch.allclose(g, g_l, atol=1e-9)
    spec = model_spec(model, "conv4", model.backbone.config())
    rebuilt = build_model(spec)
    assert rebuilt.config() == model.config() and rebuilt.config()["normalize"] is True
    rebuilt.load_state_dict(model.state_dict())  # the trained scale included


# -- transductive refinement (ANIL) ------------------------------------------------------------

def _clusters(seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Two well-separated clusters in 8-d features (first coordinate -1 and +1, 20 queries
    each, noise 0.05) with a misleading support set: one point per class, both far right
    of their clusters (0.4 and 2.0), so that the support set's decision boundary (about
    1.2) puts every class-1 query in class 0."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.zeros(2, 8, dtype=DT)
    centres[:, 0] = torch.tensor([-1.0, 1.0], dtype=DT)
    qy = torch.arange(2).repeat_interleave(20)
    qx = centres[qy] + 0.05 * torch.randn(40, 8, generator=g, dtype=DT)
    sx = torch.zeros(2, 8, dtype=DT)
    sx[:, 0] = torch.tensor([0.4, 2.0], dtype=DT)
    return sx, torch.tensor([0, 1]), qx, qy


def test_supports_refinement_exactly_for_anil() -> None:
    assert _maml(anil=True).supports_refinement
    full = _maml()
    assert not full.supports_refinement
    x = torch.randn(4, 1, 14, 14, dtype=DT)
    with torch.no_grad(), pytest.raises(ValueError, match="ANIL"):
        full.eval().fit(x[:2], torch.tensor([0, 1])).refine(x[2:])


@pytest.mark.parametrize("normalize", [False, True])
def test_refine_shape_under_no_grad_and_chains(normalize: bool) -> None:
    """Under ``torch.no_grad()`` (as the labeling engine calls it) ``refine`` returns a
    detached ``(n_q, n_way)`` predictor; ``n_iters=0`` changes nothing, and refining twice
    by one iteration equals refining once by two."""
    model = _maml(anil=True, inner_steps=1, test_inner_steps=3, normalize=normalize,
                  meta_sgd=True, pool="avg").eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        feats = model.embed(torch.randn(13, 1, 14, 14, generator=g, dtype=DT))
    sx, sy, qx = feats[:6], torch.tensor([0, 1, 2, 3, 0, 1]), feats[6:]
    with torch.no_grad():
        pred = model.fit(sx, sy, 4)
        refined = pred.refine(qx, n_iters=2)
        logits = refined(qx)
        assert logits.shape == (7, 4) and not logits.requires_grad
        assert not torch.allclose(logits, pred(qx))
        torch.testing.assert_close(pred.refine(qx, n_iters=0)(qx), pred(qx))
        torch.testing.assert_close(pred.refine(qx[:0])(qx), pred(qx))
        twice = pred.refine(qx, n_iters=1).refine(qx, n_iters=1)
        torch.testing.assert_close(twice(qx), logits)
    with torch.enable_grad():  # as evaluate() calls it: still nothing to differentiate
        assert not model.fit(sx, sy, 4).refine(qx, n_iters=1)(qx).requires_grad


def test_refine_without_inner_steps_equals_protonet_refinement() -> None:
    """With no inner step the Proto-MAML head is ProtoNet's scoring (same softmax), so the
    refined predictor equals ProtoNet's soft k-means refinement (Ren et al. 2018)."""
    model = _maml(anil=True, test_inner_steps=0).eval()
    proto = ProtoNet(model.backbone).eval()
    sx, sy, qx, _ = _clusters()
    with torch.no_grad():
        mine = model.fit(sx, sy, 2).refine(qx, n_iters=2)(qx).softmax(-1)
        theirs = proto.fit(sx, sy, 2).refine(qx, n_iters=2)(qx).softmax(-1)
    torch.testing.assert_close(mine, theirs)


@pytest.mark.parametrize("steps", [0, 5])
def test_refine_recovers_from_a_misleading_support_set(steps: int) -> None:
    """Support points far off their clusters: the adapted head misclassifies half the
    queries; soft k-means over the queries pulls the prototypes into the clusters."""
    model = _maml(anil=True, test_inner_steps=steps, inner_lr=0.4).eval()
    sx, sy, qx, qy = _clusters()
    with torch.no_grad():
        pred = model.fit(sx, sy, 2)
        plain = Fn.accuracy(pred(qx), qy).item()
        refined = Fn.accuracy(pred.refine(qx, n_iters=2)(qx), qy).item()
    assert plain <= 0.6
    assert refined == 1.0


class _Pixels(nn.Module):
    """A parameter-free backbone: ``(n, 1, 14, 14)`` images -> ``(n, 196)`` pixels."""

    feature_shape = (196,)

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1)


def test_evaluate_transductive_runs_for_anil_and_refuses_full_maml() -> None:
    """``evaluate(..., transductive=2)`` scores each episode with the ANIL predictor refined
    over that episode's queries (checked against ``fit(...).refine(...)`` written out);
    on noisy images of a pattern per class it beats the plain predictor."""
    from fewshot_studio.data.datasets import InMemoryImages
    from fewshot_studio.data.preprocess import Preprocess
    from fewshot_studio.training import evaluate as ev

    g = torch.Generator().manual_seed(0)
    targets = torch.arange(6).repeat_interleave(8)
    pattern = torch.rand(6, 1, 14, 14, generator=g)[targets] * 55
    noise = torch.rand(len(targets), 1, 14, 14, generator=g) * 200
    images = InMemoryImages((pattern + noise).to(torch.uint8), targets,
                            [str(i) for i in range(6)])
    pre = Preprocess(image_size=14, channels=1)
    anil = MAMLClassifier(_Pixels(), inner_steps=1, inner_lr=0.01, anil=True).eval()
    got = ev.evaluate(anil, images, pre, 3, 1, 4, 6, seed=0, transductive=2)
    plain = ev.evaluate(anil, images, pre, 3, 1, 4, 6, seed=0)
    assert got.n == 6 and got.transductive == 2
    assert got.accuracy > plain.accuracy
    expected = []
    for e in ev.fixed_episodes(images, 3, 1, 4, 6, seed=0)[0]:
        with torch.no_grad():
            s = anil.embed(ev._normalize(images.images[e.support], pre))
            q = anil.embed(ev._normalize(images.images[e.query], pre))
            logits = anil.fit(s, e.support_labels, 3).refine(q, n_iters=2)(q)
        expected.append(Fn.accuracy(logits, e.query_labels).item())
    assert got.per_episode == pytest.approx(expected)
    with pytest.raises(ValueError, match="transductive"):
        ev.evaluate(_maml().float(), images, pre, 3, 1, 4, 2, transductive=1)


def test_labeling_session_refines_anil_predictions(tmp_path: Path) -> None:
    """The app's "Transductive refinement" option is applied (not silently skipped) for an
    ANIL MAML checkpoint: the session refines over the queries and the probabilities move."""
    from dataclasses import replace

    from engine_fixtures import make_label_folders

    from fewshot_studio.data.preprocess import Preprocess
    from fewshot_studio.engine.api import LabelSettings
    from fewshot_studio.engine.session import LabelingSession
    from fewshot_studio.io.checkpoint import Checkpoint, save_checkpoint

    torch.manual_seed(0)
    cfg = {"in_channels": 3, "image_size": 16, "hidden": 8, "pool_layers": 3}
    model = MAMLClassifier(create_backbone("conv4", **cfg), inner_steps=1, anil=True)
    ckpt = save_checkpoint(tmp_path / "anil.safetensors", Checkpoint(
        model=model_spec(model, "conv4", cfg), preprocess=Preprocess(16, 3, (0.5,) * 3,
                                                                    (0.25,) * 3),
        state_dict=model.state_dict(), name="anil"))
    support_root, query_root, truth, _ = make_label_folders(tmp_path / "data")
    support = {c.name: sorted(c.glob("*.png")) for c in sorted(support_root.iterdir())}
    queries = [p for p in scan_images(query_root)
               if p.relative_to(query_root).as_posix() in truth]
    settings = LabelSettings(unknown_threshold=0.0, batch_size=8, transductive=True)
    with LabelingSession(ckpt, settings, cache_path=tmp_path / "cache.sqlite") as s:
        s.set_support(support)
        list(s.run(queries))
        assert s.model.supports_refinement and s.counters.extra["transductive"] == 1
        refined = s.predictions()
        plain = s.set_settings(replace(settings, transductive=False))
    assert any(abs(a.confidence - b.confidence) > 1e-6
               for a, b in zip(refined, plain, strict=True))
