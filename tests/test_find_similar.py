"""Find similar, engine side (engine/similarity.py): pooling, cosine ordering, the N most
similar, and features read back from the embedding cache."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fewshot_studio.engine.cache import EmbeddingCache, FileKey
from fewshot_studio.engine.similarity import (
    cached_features,
    cosine_to,
    most_similar,
    pool_features,
    rank_by_similarity,
)
from fewshot_studio.gui.models.gallery import Role


def test_pool_features_averages_spatial_maps_and_keeps_vectors() -> None:
    maps = np.arange(2 * 3 * 2 * 2, dtype=np.float32).reshape(2, 3, 2, 2)
    pooled = pool_features(maps)
    assert pooled.shape == (2, 3)
    np.testing.assert_allclose(pooled, maps.mean(axis=(2, 3)))
    vec = np.ones((4, 7), np.float64)
    assert pool_features(vec).shape == (4, 7) and pool_features(vec).dtype == np.float32
    with pytest.raises(ValueError):
        pool_features(np.zeros(3))


def test_cosine_ordering_is_by_angle_not_length() -> None:
    anchor = np.array([1.0, 0.0])
    feats = np.array([[0.0, 1.0],     # 90 degrees
                      [10.0, 1.0],    # ~6 degrees, long
                      [0.1, 0.0],     # 0 degrees, short
                      [-1.0, 0.0],    # 180 degrees
                      [1.0, 1.0]])    # 45 degrees
    sims = cosine_to(anchor, feats)
    np.testing.assert_allclose(sims[[2, 3, 4]], [1.0, -1.0, np.sqrt(0.5)], atol=1e-6)
    assert rank_by_similarity(sims).tolist() == [2, 1, 4, 0, 3]
    valid = np.array([True, False, True, True, True])
    assert rank_by_similarity(sims, valid).tolist() == [2, 4, 0, 3, 1]  # invalid last
    assert rank_by_similarity(np.zeros(3)).tolist() == [0, 1, 2]  # ties: row order
    assert cosine_to(anchor, np.zeros((1, 2)))[0] == 0.0


def test_most_similar_excludes_the_anchor_and_invalid_rows() -> None:
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(20, 5))
    sims = cosine_to(feats[3], feats)
    valid = np.ones(20, bool)
    valid[7] = False
    top = most_similar(sims, 4, valid, exclude=[3])
    expected = [i for i in np.argsort(-sims) if i not in (3, 7)][:4]
    assert top.tolist() == expected
    assert len(most_similar(sims, 100, valid, exclude=[3])) == 18
    assert len(most_similar(sims, 0)) == 0


def _write_images(tmp_path: Path, n: int) -> list[Path]:
    paths = []
    for i in range(n):
        p = tmp_path / f"img{i}.jpg"
        p.write_bytes(b"x" * (i + 1))
        paths.append(p)
    return paths


def test_cached_features_reads_pooled_features_back(tmp_path: Path) -> None:
    paths = _write_images(tmp_path, 4)
    db = tmp_path / "cache.sqlite"
    feats = np.random.default_rng(1).normal(size=(4, 3, 2, 2)).astype(np.float32)
    with EmbeddingCache(db) as cache:
        cache.store("m:v2", [(FileKey.of(p), f, "") for p, f in zip(paths[:3], feats[:3],
                                                                     strict=True)])
        cache.store("other:v2", [(FileKey.of(paths[3]), feats[3], "")])
    table = cached_features([*paths, tmp_path / "gone.jpg"], "m:v2", db)
    assert table.valid.tolist() == [True, True, True, False, False]
    assert table.feats.shape == (5, 3)
    np.testing.assert_allclose(table.feats[:3], feats[:3].mean(axis=(2, 3)), rtol=1e-6)
    assert table.row_of(paths[2]) == 2 and table.row_of(tmp_path / "nope.jpg") is None
    sims = table.similarities(0)
    assert sims[0] == pytest.approx(1.0) and np.isneginf(sims[3:]).all()
    assert not cached_features(paths, "absent:v2", db).valid.any()


# -- in the window: find similar, label the N most similar (real engine, tiny checkpoint) ------
N_QUERY = 5  # per class


def make_similar_data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny checkpoint, 3 colour classes of 2 examples and 5 query images, one broken
    query file (shared with test_embedding_map.py)."""
    from _gui_helpers import make_dataset, tiny_checkpoint

    root = tmp_path_factory.mktemp("similar")
    ckpt = tiny_checkpoint(root / "tiny.safetensors")
    support, query = make_dataset(root / "ds", n_support=2, n_query=N_QUERY)
    (query / "broken.jpg").write_bytes(b"not an image")
    return {"ckpt": ckpt, "support": support, "query": query}


def labeled_window(qtbot, similar_data: dict, tmp_path: Path, **settings: Any
                   ) -> Iterator[Any]:
    """A shown window, labeled with the real engine (features in its own cache file), with
    ``LabelSettings(unknown_threshold=0.0, **settings)``."""
    from _gui_helpers import label_and_wait, shown_window

    from fewshot_studio.engine.api import LabelSettings
    from fewshot_studio.gui.project_io import PALETTE, ClassSpec, Project

    w = shown_window(qtbot)
    w.project.apply(Project(
        classes=[ClassSpec(n, PALETTE[i], list(ps))
                 for i, (n, ps) in enumerate(similar_data["support"].items())],
        query_folder=similar_data["query"], checkpoint=str(similar_data["ckpt"]),
        settings=LabelSettings(**{"unknown_threshold": 0.0, **settings})))
    w.labeling.set_cache_path(tmp_path / "cache.sqlite")
    qtbot.waitUntil(lambda: w.gallery_model.rowCount() == 3 * N_QUERY + 1, timeout=10_000)
    label_and_wait(qtbot, w)
    yield w
    w.close()


@pytest.fixture(scope="module")
def similar_data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return make_similar_data(tmp_path_factory)


@pytest.fixture
def labeled_win(qtbot, similar_data: dict, tmp_path: Path) -> Iterator[Any]:
    yield from labeled_window(qtbot, similar_data, tmp_path)


def _expected_order(w, anchor: Path) -> list[Path]:
    paths = w.gallery_model.paths()
    table = cached_features(paths, w.labeling.feature_id, w.labeling.cache_path)
    row = table.row_of(anchor)
    return [paths[i] for i in rank_by_similarity(table.similarities(row), table.valid)]


def test_find_similar_sorts_the_gallery_off_the_ui_thread(qtbot, labeled_win) -> None:
    import threading

    w = labeled_win
    ctl = w.embedding_map
    w.proxy.set_sort(True)  # "least confident first" gives way to the similarity order
    anchor = next(p for p in w.gallery_model.paths() if p.name == "blue_0002.png")
    expected = _expected_order(w, anchor)
    assert expected[0] == anchor and expected[-1].name == "broken.jpg"  # no feature: last
    with qtbot.waitSignal(ctl.similar_sorted, timeout=10_000):
        worker = ctl.find_similar(anchor)
    assert worker is not None and worker.thread_ident != threading.get_ident()
    assert w.gallery_model.paths() == expected
    assert not w.proxy.by_confidence
    # the five blue images are the most alike (one colour each class, same model)
    assert {p.name.split("_")[0] for p in expected[:N_QUERY]} == {"blue"}
    cur = w.gallery.currentIndex()
    assert Path(cur.data(Role.PATH)) == anchor  # the anchor is selected (Details shows it)


def test_find_similar_action_acts_on_the_current_image(qtbot, labeled_win) -> None:
    w = labeled_win
    ctl = w.embedding_map
    anchor = next(p for p in w.gallery_model.paths() if p.name == "green_0001.png")
    w.reviewing.move_to(anchor)
    assert ctl.find_action in w.gallery.actions()  # the gallery's context menu
    with qtbot.waitSignal(ctl.similar_sorted, timeout=10_000):
        ctl.find_action.trigger()
    assert w.gallery_model.paths() == _expected_order(w, anchor)


def test_label_n_most_similar_is_one_undoable_action(qtbot, labeled_win) -> None:
    from _gui_helpers import wait_idle

    w = labeled_win
    ctl = w.embedding_map
    anchor = next(p for p in w.gallery_model.paths() if p.name == "red_0003.png")
    top4 = _expected_order(w, anchor)[:4]
    w.reviewing.move_to(anchor)
    depth = w.stack.count()
    asked: list[Path] = []
    ctl.ask_label_similar = lambda p: (asked.append(p), (4, 2))[1]  # 4 images, class "blue"
    with qtbot.waitSignal(w.labeling.relabeled, timeout=10_000):
        ctl.label_action.trigger()
    wait_idle(qtbot, w)
    assert asked == [anchor]
    assert w.stack.count() == depth + 1  # one action
    assert w.labeling.corrections == {p: "blue" for p in top4}
    for p in top4:
        pred = w.gallery_model.prediction_for(p)
        assert pred.corrected and pred.label == "blue"
    w.stack.undo()
    wait_idle(qtbot, w)
    assert w.labeling.corrections == {}
    assert not any(w.gallery_model.prediction_for(p).corrected for p in top4)
    w.stack.redo()
    wait_idle(qtbot, w)
    assert w.labeling.corrections == {p: "blue" for p in top4}


@pytest.fixture
def tta_win(qtbot, similar_data: dict, tmp_path: Path) -> Iterator[Any]:
    yield from labeled_window(qtbot, similar_data, tmp_path, tta=True)


def test_features_are_read_under_the_key_the_run_used(qtbot, tta_win) -> None:
    """With test-time augmentation on, the run caches its features under another key than
    plain fp32 (``:tta2``): find similar reads them under the key the run really used."""
    w = tta_win
    key = w.labeling.feature_id
    assert key.endswith(":tta2")
    paths = w.gallery_model.paths()
    plain = key.removesuffix(":tta2")
    assert not cached_features(paths, plain, w.labeling.cache_path).valid.any()
    assert cached_features(paths, key, w.labeling.cache_path).valid.sum() == 3 * N_QUERY
    anchor = next(p for p in paths if p.name == "red_0001.png")
    with qtbot.waitSignal(w.embedding_map.similar_sorted, timeout=10_000):
        w.embedding_map.find_similar(anchor)
    assert w.gallery_model.paths() == _expected_order(w, anchor)
    assert w.gallery_model.paths()[0] == anchor
    w.labeling.set_checkpoint("")  # another model: its features are not these
    assert w.labeling.feature_id == ""
