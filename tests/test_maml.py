"""MAML, the few-shot method: Proto-MAML heads for any number of classes, fit and its
predictors (query normalisation), configs and the backbone it needs, batch-statistics
norms, ANIL transductive refinement."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from maml_fixtures import DT, Pixels, image_tasks, small_maml
from torch import Tensor, nn

from fewshot_studio.data.scan import scan_images
from fewshot_studio.models import (
    METHODS,
    build_model,
    create_backbone,
    create_model,
    model_spec,
)
from fewshot_studio.models import functional as Fn
from fewshot_studio.models.layers import BatchStatNorm2d, has_running_stats, use_vmap_safe_norms
from fewshot_studio.models.maml import MAMLClassifier, proto_head
from fewshot_studio.models.protonet import ProtoNet


def test_proto_head_starts_as_protonet() -> None:
    """Before adaptation the Proto-MAML head scores like ProtoNet (same softmax)."""
    model = small_maml(inner_steps=0, anil=True).eval()
    proto = ProtoNet(model.backbone).eval()
    sx, sy, qx, _ = (a[0] for a in image_tasks(1, 4, 2, 3))
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
    model = small_maml(inner_steps=1, test_inner_steps=5, inner_lr=0.5, anil=anil).eval()
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
    model = small_maml(inner_steps=1).train()
    sx, sy, qx, qy = (a[0] for a in image_tasks(1, 3, 1, 1))
    logits = model(sx, sy, qx)
    assert logits.requires_grad
    model.loss(logits, qy).backward()
    assert model.backbone.encoder[0][0].weight.grad is not None


def test_embed_identity_for_full_maml_and_features_for_anil() -> None:
    x = torch.randn(3, 1, 14, 14, dtype=DT)
    assert torch.equal(small_maml().embed(x), x)
    anil = small_maml(anil=True, pool="avg").eval()
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


@pytest.mark.parametrize("backbone", ["conv4", "resnet12"])
def test_create_model_builds_the_backbone_the_method_needs(backbone: str) -> None:
    """The "maml" entry declares batch statistics for full MAML (none for ANIL), and
    create_model builds the backbone that way unless told otherwise, which MAML refuses."""
    small = {"image_size": 16, "in_channels": 1}
    full = create_model("maml", backbone, {}, small)
    assert not has_running_stats(full.backbone)
    assert full.backbone.config()["track_running_stats"] is False
    anil = create_model("maml", backbone, {"anil": True}, small)
    assert has_running_stats(anil.backbone)
    assert METHODS.get("maml").cfg.backbone_needs({}) == {"track_running_stats": False}
    assert METHODS.get("protonet").cfg.backbone_needs({}) == {}
    with pytest.raises(ValueError, match="track_running_stats"):
        create_model("maml", backbone, {}, {**small, "track_running_stats": True})
    spec = model_spec(full, backbone, full.backbone.config())
    build_model(spec).load_state_dict(full.state_dict())  # the spec rebuilds the same net


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


@pytest.mark.parametrize("query_norm", ["support", "support+query"])
def test_full_maml_query_prediction_independent_of_batch(query_norm: str) -> None:
    """Eval mode: a query scored alone, in a tiny chunk or in a big batch gets the same
    logits (the engine scores queries in chunks); the "batch" statistics of Finn et al. do
    not have this property."""
    model = small_maml(inner_steps=1, test_inner_steps=2, inner_lr=0.3,
                  query_norm=query_norm).eval()
    sx, sy, qx, _ = (a[0] for a in image_tasks(1, 3, 2, 4, seed=5))
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
        small_maml(query_norm="running")


def test_normalized_head_starts_as_cosine_classifier() -> None:
    """``normalize=True``: features are unit vectors times a trained scale, and before
    adaptation a task scores ``scale * cos(q, c) - scale / 2`` (``c``: the class's mean
    normalised feature), for one shot and for several."""
    model = small_maml(inner_steps=0, anil=True, normalize=True, scale=8.0, pool="avg").eval()
    sx, sy, qx, _ = (a[0] for a in image_tasks(1, 4, 3, 3))
    with torch.no_grad():
        logits = model(sx, sy, qx, n_way=4)
        pooled_q = model.backbone(qx).mean(dim=(-2, -1))
        pooled_s = F.normalize(model.backbone(sx).mean(dim=(-2, -1)), dim=-1)
        expected = 8.0 * Fn.cosine_logits(pooled_q, Fn.prototypes(pooled_s, sy, 4), 1.0) - 4.0
        norms = model.embed(qx).norm(dim=-1)
    assert torch.allclose(logits, expected, atol=1e-10)
    assert torch.allclose(norms, torch.full((12,), 2.0, dtype=DT))


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
    assert small_maml(anil=True).supports_refinement
    full = small_maml()
    assert not full.supports_refinement
    x = torch.randn(4, 1, 14, 14, dtype=DT)
    with torch.no_grad(), pytest.raises(ValueError, match="ANIL"):
        full.eval().fit(x[:2], torch.tensor([0, 1])).refine(x[2:])


@pytest.mark.parametrize("normalize", [False, True])
def test_refine_shape_under_no_grad_and_chains(normalize: bool) -> None:
    """Under ``torch.no_grad()`` (as the labeling engine calls it) ``refine`` returns a
    detached ``(n_q, n_way)`` predictor; ``n_iters=0`` changes nothing, and refining twice
    by one iteration equals refining once by two."""
    model = small_maml(anil=True, inner_steps=1, test_inner_steps=3, normalize=normalize,
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
    model = small_maml(anil=True, test_inner_steps=0).eval()
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
    model = small_maml(anil=True, test_inner_steps=steps, inner_lr=0.4).eval()
    sx, sy, qx, qy = _clusters()
    with torch.no_grad():
        pred = model.fit(sx, sy, 2)
        plain = Fn.accuracy(pred(qx), qy).item()
        refined = Fn.accuracy(pred.refine(qx, n_iters=2)(qx), qy).item()
    assert plain <= 0.6
    assert refined == 1.0


def test_evaluate_transductive_runs_for_anil_and_refuses_fullsmall_maml() -> None:
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
    anil = MAMLClassifier(Pixels(), inner_steps=1, inner_lr=0.01, anil=True).eval()
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
        ev.evaluate(small_maml().float(), images, pre, 3, 1, 4, 2, transductive=1)


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
