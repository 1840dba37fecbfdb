"""EpisodeSampler invariants, determinism and validation errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fewshot_studio.data.sampler import Episode, EpisodeSampler, stack_episodes
from fewshot_studio.errors import UserError


def _targets(counts: list[int]) -> np.ndarray:
    t = np.concatenate([np.full(c, i) for i, c in enumerate(counts)])
    return np.random.default_rng(0).permutation(t)  # interleaved, not sorted


def _check(ep: Episode, targets: np.ndarray, way: int, shot: int, query: int) -> None:
    assert ep.support.shape == (way * shot,) and ep.query.shape == (way * query,)
    assert ep.support.dtype == torch.int64 and ep.query_labels.dtype == torch.int64
    assert ep.classes.shape == (way,)
    assert len(set(ep.classes.tolist())) == way  # N distinct classes
    s, q = set(ep.support.tolist()), set(ep.query.tolist())
    assert len(s) == way * shot and len(q) == way * query  # no repeats
    assert not s & q  # disjoint
    # labels are class-major and map back to the dataset's class ids
    assert ep.support_labels.tolist() == [i for i in range(way) for _ in range(shot)]
    assert ep.query_labels.tolist() == [i for i in range(way) for _ in range(query)]
    cls = ep.classes.numpy()
    np.testing.assert_array_equal(targets[ep.support.numpy()], cls[ep.support_labels.numpy()])
    np.testing.assert_array_equal(targets[ep.query.numpy()], cls[ep.query_labels.numpy()])


@pytest.mark.parametrize("counts", [[20] * 12, [7, 9, 30, 8, 12, 7, 50]])
def test_invariants(counts: list[int]) -> None:
    t = _targets(counts)
    way, shot, query = 5, 2, 5
    sampler = EpisodeSampler(torch.from_numpy(t), way, shot, query, seed=3)
    it = iter(sampler)
    seen = set()
    for _ in range(200):
        ep = next(it)
        _check(ep, t, way, shot, query)
        seen.update(ep.classes.tolist())
    assert seen == set(range(len(counts)))  # every class gets drawn


def test_all_images_of_smallest_class_used_exactly() -> None:
    t = _targets([7, 7, 7])
    ep = EpisodeSampler(t, 3, 2, 5, seed=0).sample()
    assert sorted(ep.support.tolist() + ep.query.tolist()) == list(range(21))


def test_deterministic_stream_and_fixed_eval_episodes() -> None:
    t = _targets([10] * 8)
    a, b = EpisodeSampler(t, 4, 1, 3, seed=7), EpisodeSampler(t, 4, 1, 3, seed=7)
    ea, eb = a.sample_batch(5), b.sample_batch(5)
    for x, y in zip(ea, eb, strict=True):
        assert torch.equal(x.support, y.support) and torch.equal(x.query, y.query)
    c = EpisodeSampler(t, 4, 1, 3, seed=8).sample_batch(5)
    assert any(not torch.equal(x.support, y.support) for x, y in zip(ea, c, strict=True))
    # episodes() does not depend on what was drawn before
    fixed1 = a.episodes(4)
    a.sample_batch(3)
    fixed2 = a.episodes(4)
    for x, y in zip(fixed1, fixed2, strict=True):
        assert torch.equal(x.support, y.support) and torch.equal(x.classes, y.classes)


def test_state_dict_resumes_stream() -> None:
    t = _targets([10] * 8)
    a = EpisodeSampler(t, 4, 2, 2, seed=1)
    a.sample_batch(3)
    state = json.loads(json.dumps(a.state_dict()))  # JSON-safe
    nxt = a.sample()
    b = EpisodeSampler(t, 4, 2, 2, seed=1)
    b.load_state_dict(state)
    assert torch.equal(b.sample().query, nxt.query)


def test_restrict_to_classes() -> None:
    t = _targets([10] * 8)
    s = EpisodeSampler(t, 3, 1, 1, seed=0, classes=[1, 4, 6])
    for ep in s.sample_batch(10):
        assert set(ep.classes.tolist()) == {1, 4, 6}


def test_too_few_classes() -> None:
    with pytest.raises(UserError, match=r"5-way episodes need at least 5 classes.*has 3"):
        EpisodeSampler(_targets([10, 10, 10]), 5, 1, 1, seed=0)


def test_small_class_is_named() -> None:
    names = ["cats", "dogs", "owls"]
    with pytest.raises(UserError, match=r"'owls' \(4\).*fewer than shot\+query = 2\+3 = 5"):
        EpisodeSampler(_targets([10, 10, 4]), 2, 2, 3, seed=0, class_names=names)
    with pytest.raises(UserError, match=r"class '2' \(4\)"):
        EpisodeSampler(_targets([10, 10, 4]), 2, 2, 3, seed=0)


def test_invalid_shape() -> None:
    with pytest.raises(UserError, match="invalid episode shape"):
        EpisodeSampler(_targets([10, 10]), 2, 0, 3, seed=0)


def test_stack_episodes() -> None:
    eps = EpisodeSampler(_targets([10] * 6), 5, 1, 2, seed=0).sample_batch(4)
    st = stack_episodes(eps)
    assert st.support.shape == (4, 5) and st.query.shape == (4, 10) and st.classes.shape == (4, 5)
