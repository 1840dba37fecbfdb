"""The pure tensor math of fewshot_studio.models.functional, against explicit loops."""

from __future__ import annotations

import math

import pytest
import torch

from fewshot_studio.models import functional as Fn


def test_one_hot_and_infer_n_way() -> None:
    labels = torch.tensor([2, 0, 1, 2])
    oh = Fn.one_hot(labels, 4)
    assert oh.shape == (4, 4) and oh.dtype == torch.float32
    assert oh.argmax(1).tolist() == [2, 0, 1, 2] and oh.sum().item() == 4
    assert Fn.infer_n_way(labels) == 3 and Fn.infer_n_way(labels, 7) == 7
    with pytest.raises(ValueError):
        Fn.infer_n_way(torch.tensor([], dtype=torch.long))


def test_prototypes_are_class_means_with_unequal_shots() -> None:
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(7, 5, generator=g)
    labels = torch.tensor([0, 1, 0, 2, 2, 2, 1])
    protos = Fn.prototypes(feats, labels, 3)
    for c in range(3):
        assert torch.allclose(protos[c], feats[labels == c].mean(0), atol=1e-6)
    # feature maps work the same way
    maps = torch.randn(7, 2, 3, 3, generator=g)
    pm = Fn.prototypes(maps, labels)
    assert pm.shape == (3, 2, 3, 3)
    assert torch.allclose(pm[2], maps[labels == 2].mean(0), atol=1e-6)


def test_squared_euclidean_logits_by_hand() -> None:
    q = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    p = torch.tensor([[1.0, 1.0], [3.0, -1.0], [1.0, 2.0]])
    expected = torch.tensor([[-2.0, -10.0, -5.0], [-1.0, -13.0, 0.0]])
    assert torch.allclose(Fn.squared_euclidean_logits(q, p), expected, atol=1e-5)
    g = torch.Generator().manual_seed(1)
    q, p = torch.randn(6, 9, generator=g), torch.randn(4, 9, generator=g)
    loop = torch.tensor([[-float(((q[i] - p[j]) ** 2).sum()) for j in range(4)]
                         for i in range(6)])
    assert torch.allclose(Fn.squared_euclidean_logits(q, p), loop, atol=1e-4)


def test_cosine_logits_by_hand() -> None:
    q = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    p = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    s = 1 / math.sqrt(2)
    expected = 5.0 * torch.tensor([[1.0, 0.0], [s, s]])
    assert torch.allclose(Fn.cosine_logits(q, p, 5.0), expected, atol=1e-6)


def test_soft_kmeans_refine_matches_formula() -> None:
    g = torch.Generator().manual_seed(2)
    s = torch.randn(6, 3, generator=g)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    q = torch.randn(5, 3, generator=g)
    p0 = Fn.prototypes(s, y, 3)
    temp = 2.0
    # one iteration written out
    z = torch.softmax(Fn.squared_euclidean_logits(q, p0) / temp, dim=1)
    expected = torch.stack([
        (s[y == c].sum(0) + (z[:, c:c + 1] * q).sum(0)) / (2 + z[:, c].sum())
        for c in range(3)])
    got = Fn.soft_kmeans_refine(p0, s, y, q, n_iters=1, temperature=temp)
    assert torch.allclose(got, expected, atol=1e-5)
    # two iterations = one applied twice; zero iterations or no queries = unchanged
    twice = Fn.soft_kmeans_refine(got, s, y, q, n_iters=1, temperature=temp)
    assert torch.allclose(Fn.soft_kmeans_refine(p0, s, y, q, 2, temp), twice, atol=1e-5)
    assert torch.equal(Fn.soft_kmeans_refine(p0, s, y, q, 0), p0)
    assert torch.equal(Fn.soft_kmeans_refine(p0, s, y, q[:0], 3), p0)


def test_soft_kmeans_pulls_prototypes_towards_query_clusters() -> None:
    # support is off-centre; unlabeled queries sit at the true centres
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    s = centres + torch.tensor([[2.0, 0.0], [-2.0, 0.0]])
    y = torch.tensor([0, 1])
    q = centres.repeat_interleave(20, 0)
    p0 = Fn.prototypes(s, y, 2)
    p1 = Fn.soft_kmeans_refine(p0, s, y, q, n_iters=3)
    assert (p1 - centres).norm(dim=1).max() < 0.5 * (p0 - centres).norm(dim=1).min()


def test_accuracy() -> None:
    logits = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 3.0], [5.0, -1.0]])
    assert Fn.accuracy(logits, torch.tensor([0, 1, 0, 0])).item() == pytest.approx(0.75)
