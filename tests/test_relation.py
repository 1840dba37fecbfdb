"""Relation Network: shapes, the split first layer equals explicit concatenation, the loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fewshot_studio.models import METHODS, build_model, create_backbone, model_spec
from fewshot_studio.models import functional as Fn
from fewshot_studio.models.relation import RelationNetwork


def _model(**kw: object) -> RelationNetwork:
    bb = create_backbone("conv4", in_channels=1, image_size=28, pool_layers=2)
    return RelationNetwork(bb, **kw)  # type: ignore[arg-type]


def test_registered_and_shapes() -> None:
    assert METHODS.get("relation").factory is RelationNetwork
    model = _model()
    sx, qx = torch.randn(10, 1, 28, 28), torch.randn(7, 1, 28, 28)
    sy = torch.arange(5).repeat(2)
    assert model.embed(sx).shape == (10, 64, 7, 7)
    assert model(sx, sy, qx).shape == (7, 5)
    pred = model.fit(model.embed(sx), sy, n_way=5)
    assert pred.class_features.shape == (5, 64, 7, 7)
    assert pred(model.embed(qx)).shape == (7, 5)


def test_one_by_one_maps_and_mlp_module() -> None:
    # 4 poolings at 28 px give 1x1 maps: the relation module must skip its poolings
    bb = create_backbone("conv4", in_channels=1, image_size=28)
    model = RelationNetwork(bb)
    x = torch.randn(6, 1, 28, 28)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    assert model(x, y, x[:4]).shape == (4, 3)
    mlp = RelationNetwork(create_backbone("conv4", in_channels=3, image_size=32), module="mlp",
                          hidden=16)
    xr = torch.randn(6, 3, 32, 32)
    assert mlp.embed(xr).shape == (6, 64)
    assert mlp(xr, y, xr[:5]).shape == (5, 3)


def _reference_scores(model: RelationNetwork, query: torch.Tensor,
                      classes: torch.Tensor) -> torch.Tensor:
    """The paper's formulation written out: concatenate every (class, query) pair along the
    channels and run the relation module's layers on the pair batch."""
    r = model.relation
    n_q, n_way = query.shape[0], classes.shape[0]
    pairs = torch.cat([classes.unsqueeze(0).expand(n_q, -1, -1, -1, -1),
                       query.unsqueeze(1).expand(-1, n_way, -1, -1, -1)], dim=2).flatten(0, 1)
    x = F.relu(r.bn1(r.conv1(pairs)))
    x = F.max_pool2d(x, 2)
    x = F.relu(r.bn2(r.conv2(x)))
    x = F.max_pool2d(x, 2)
    return r.fc2(F.relu(r.fc1(x.flatten(1)))).view(n_q, n_way)


@pytest.mark.parametrize("train", [True, False])
def test_split_first_layer_equals_concatenation(train: bool) -> None:
    torch.manual_seed(0)
    model = _model(aggregate="sum")
    model.train(train)
    feats = torch.randn(9, 64, 7, 7)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 3])
    query = torch.randn(5, 64, 7, 7)
    pred = model.fit(feats, labels)
    # paper: class maps are sums over the shots
    assert torch.allclose(pred.class_features[3], feats[6:].sum(0), atol=1e-5)
    ref = _reference_scores(model, query, pred.class_features)
    assert torch.allclose(pred(query), ref, atol=1e-4)
    mean_pred = _model(aggregate="mean").fit(feats, labels)
    assert torch.allclose(mean_pred.class_features[3], feats[6:].mean(0), atol=1e-5)


def test_loss_is_mse_of_sigmoid_against_one_hot() -> None:
    model = _model()
    logits = torch.tensor([[2.0, -1.0, 0.0], [0.5, 0.5, -3.0]], requires_grad=True)
    labels = torch.tensor([0, 2])
    s = torch.sigmoid(logits.detach())
    target = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    expected = ((s - target) ** 2).sum() / 6
    loss = model.loss(logits, labels)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_trains_and_spec_round_trip() -> None:
    torch.manual_seed(0)
    model = _model(hidden=16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sx, qx = torch.randn(6, 1, 28, 28), torch.randn(6, 1, 28, 28)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    first = None
    for _ in range(15):
        loss = model.loss(model(sx, y, sx), y)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first
    spec = model_spec(model, "conv4", model.backbone.config())
    rebuilt = build_model(spec)
    rebuilt.load_state_dict(model.state_dict())
    model.eval(), rebuilt.eval()
    with torch.no_grad():
        assert torch.allclose(model(sx, y, qx), rebuilt(sx, y, qx), atol=1e-6)


def test_cosine_skip_starts_as_cosine_nearest_centroid_and_learns_a_residual() -> None:
    """``skip="cosine"``: before training, scores are ``a cos(q, c) + b`` exactly (the module's
    last layer starts at zero), so the ranking is cosine nearest-centroid's; training moves the
    module off zero; the spec rebuilds it."""
    torch.manual_seed(0)
    bb = create_backbone("conv4", in_channels=3, image_size=32)
    model = RelationNetwork(bb, module="mlp", hidden=16, skip="cosine", skip_scale=6.0)
    x, q = torch.randn(6, 3, 32, 32), torch.randn(5, 3, 32, 32)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    model.eval()
    with torch.no_grad():
        feats, qf = model.embed(x), model.embed(q)
        expected = 6.0 * F.cosine_similarity(qf[:, None], Fn.prototypes(feats, y)[None],
                                             dim=-1) - 3.0
        assert torch.allclose(model(x, y, q), expected, atol=1e-5)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(5):
        loss = model.loss(model(x, y, x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert model.relation.fc3.weight.abs().sum() > 0
    assert model.cos_scale.item() != 6.0
    rebuilt = build_model(model_spec(model, "conv4", bb.config()))
    assert rebuilt.config() == model.config()
    rebuilt.load_state_dict(model.state_dict())
    model.eval(), rebuilt.eval()
    with torch.no_grad():
        assert torch.allclose(model(x, y, q), rebuilt(x, y, q), atol=1e-6)
    with pytest.raises(ValueError, match="skip"):
        RelationNetwork(bb, module="mlp", skip="dot")


def test_transductive_refine_moves_class_means_towards_their_queries() -> None:
    """``refine``: soft k-means of the class means over the queries, assignments by the
    relation scores; equal to the functional refinement with the model's scores."""
    torch.manual_seed(0)
    model = _model().eval()
    feats, labels = torch.randn(6, 64, 7, 7), torch.tensor([0, 1, 2, 0, 1, 2])
    query = torch.randn(9, 64, 7, 7)
    with torch.no_grad():
        pred = model.fit(feats, labels)
        refined = pred.refine(query, n_iters=2)
        expected = Fn.soft_kmeans_refine(pred.class_features, feats, labels, query, n_iters=2,
                                         logits_fn=model.scores)
        assert torch.allclose(refined.class_features, expected, atol=1e-6)
        assert not torch.allclose(refined.class_features, pred.class_features)
        assert refined(query).shape == (9, 3)
    summed = _model(aggregate="sum")
    assert model.supports_refinement and not summed.supports_refinement
    with pytest.raises(ValueError, match="mean"):
        summed.fit(feats, labels).refine(query)
