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


def _alphabets(chars: list[int], n_drawers: int = 6, per_drawer: int = 1
               ) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Targets (N,), each class's group (alphabet K has chars[K] classes) and each item's
    drawer (N,): every class has ``per_drawer`` images by each of ``n_drawers`` drawers."""
    groups = [f"a{k}" for k, n in enumerate(chars) for _ in range(n)]
    per_class = n_drawers * per_drawer
    targets = np.repeat(np.arange(len(groups)), per_class)
    drawers = np.tile(np.repeat(np.arange(1, n_drawers + 1), per_drawer), len(groups))
    return targets, groups, drawers


@pytest.mark.parametrize("per_drawer", [1, 2])
def test_within_group_episodes_share_a_group_and_split_drawers(per_drawer: int) -> None:
    t, groups, drawers = _alphabets([5, 4, 2], per_drawer=per_drawer)
    sampler = EpisodeSampler(t, 4, 1, 3, seed=0, groups=groups, drawers=drawers)
    assert sampler.groups_used == ["a0", "a1"] and sampler.groups_skipped == ["a2"]
    assert sampler.within_groups and sampler.by_drawers
    seen = set()
    for ep in sampler.episodes(200):
        _check(ep, t, 4, 1, 3)
        assert len({groups[c] for c in ep.classes.tolist()}) == 1
        seen.add(groups[int(ep.classes[0])])
        s_dr, q_dr = set(drawers[ep.support.numpy()]), set(drawers[ep.query.numpy()])
        assert len(s_dr) == 1 and len(q_dr) == 3 and not s_dr & q_dr  # episode-wide drawers
    assert seen == {"a0", "a1"}
    again = EpisodeSampler(t, 4, 1, 3, seed=0, groups=groups, drawers=drawers).episodes(200)
    assert all(torch.equal(a.query, b.query) for a, b in zip(again, sampler.episodes(200),
                                                             strict=True))


def test_within_group_without_drawers_and_with_a_missing_drawer() -> None:
    t, groups, drawers = _alphabets([3, 3])
    ep = EpisodeSampler(t, 3, 2, 2, seed=1, groups=groups).sample()
    assert len({groups[c] for c in ep.classes.tolist()}) == 1
    _check(ep, t, 3, 2, 2)
    # class 0 lacks drawer 1: its alphabet keeps the 5 drawers that drew every class
    t, groups, drawers = _alphabets([3, 3], per_drawer=2)
    keep = ~((t == 0) & (drawers == 1))
    s = EpisodeSampler(t[keep], 3, 1, 4, seed=0, groups=groups, drawers=drawers[keep])
    assert s.groups_used == ["a0", "a1"]
    for e in s.episodes(50):
        if groups[int(e.classes[0])] == "a0":
            assert 1 not in set(drawers[keep][torch.cat([e.support, e.query]).numpy()])
    s = EpisodeSampler(t[keep], 3, 1, 5, groups=groups, drawers=drawers[keep])  # 6 drawers
    assert s.groups_used == ["a1"] and s.groups_skipped == ["a0"]
    with pytest.raises(UserError, match="at least shot\\+query = 7 drawers"):
        EpisodeSampler(t, 3, 1, 6, groups=groups, drawers=drawers)  # 12 images, 6 drawers


def test_no_group_with_enough_classes_is_a_user_error() -> None:
    t, groups, drawers = _alphabets([3, 2])
    with pytest.raises(UserError, match=r"no group \(alphabet\) has 4 classes.*'a0', has 3"):
        EpisodeSampler(t, 4, 1, 1, groups=groups, drawers=drawers)


def test_group_fraction_mixes_hard_episodes_into_the_stream() -> None:
    t, groups, drawers = _alphabets([6, 6, 6, 6])
    plain = EpisodeSampler(t, 5, 1, 2, seed=4)
    off = EpisodeSampler(t, 5, 1, 2, seed=4, groups=groups, drawers=drawers, group_fraction=0)
    assert not off.within_groups
    assert all(torch.equal(a.query, b.query) for a, b in zip(plain.episodes(20),
                                                             off.episodes(20), strict=True))
    half = EpisodeSampler(t, 5, 1, 2, seed=4, groups=groups, drawers=drawers,
                          group_fraction=0.5)
    one_group = [len({groups[c] for c in e.classes.tolist()}) == 1 for e in half.sample_batch(400)]
    # a random 5-of-24 draw lies in one group with probability 4 * C(6,5) / C(24,5) < 0.1%
    assert 0.4 < np.mean(one_group) < 0.6
    with pytest.raises(UserError, match="fraction"):
        EpisodeSampler(t, 5, 1, 2, groups=groups, group_fraction=1.5)
