"""Test-time augmentation: fixed views, their averaged features in evaluation and in the
labeling engine (its own cache key), and the CLI flags."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from engine_fixtures import COLOURS, make_checkpoint, make_label_folders

from fewshot_studio.data.preprocess import Preprocess
from fewshot_studio.data.tta import TTA_VIEWS, effective_views, embed_tta, tta_kind, tta_views
from fewshot_studio.engine.api import LabelSettings
from fewshot_studio.engine.cache import FileKey
from fewshot_studio.engine.session import LabelingSession
from fewshot_studio.training.evaluate import embed_all, evaluate


def _strokes(n: int = 3, size: int = 28) -> torch.Tensor:
    """``(n, 1, size, size)`` images of thin random strokes on a flat background."""
    g = torch.Generator().manual_seed(1)
    x = torch.full((n, 1, size, size), -1.0)
    for i in range(n):
        r, c = torch.randint(4, size - 4, (2,), generator=g).tolist()
        x[i, 0, r, 4:size - 4] = 1.0
        x[i, 0, 4:size - 4, c] = 1.0
    return x


def test_kinds_and_view_counts() -> None:
    assert tta_kind(Preprocess(28, 1)) == "characters"
    assert tta_kind(Preprocess(224, 3, (0.5,) * 3, (0.5,) * 3)) == "photos"
    assert effective_views(0, "characters") == effective_views(1, "photos") == 1
    assert effective_views(8, "characters") == 8 and effective_views(8, "photos") == 2


def test_character_views_are_fixed_per_view_whatever_the_batch() -> None:
    x = _strokes()
    views = tta_views(x, 5, "characters")
    assert len(views) == 5 and torch.equal(views[0], x)
    for v in views[1:]:
        assert v.shape == x.shape and not torch.allclose(v, x, atol=1e-3)  # really changed
    # the same image gets the same views alone or in another batch (cacheable features)
    alone = tta_views(x[1:2], 5, "characters")
    for v, a in zip(views, alone, strict=True):
        torch.testing.assert_close(v[1:2], a)
    assert not torch.allclose(views[1], views[2])  # distinct views
    # a seed fixes them
    for v, w in zip(views, tta_views(x, 5, "characters"), strict=True):
        assert torch.equal(v, w)


def test_photo_views_are_the_image_and_its_mirror() -> None:
    x = torch.randn(2, 3, 8, 8)
    views = tta_views(x, TTA_VIEWS, "photos")
    assert len(views) == 2 and torch.equal(views[0], x) and torch.equal(views[1], x.flip(-1))


def test_embed_tta_averages_the_views() -> None:
    x = _strokes()
    w = torch.randn(28 * 28, 4)

    def embed(v: torch.Tensor) -> torch.Tensor:
        return v.flatten(1) @ w

    want = torch.stack([embed(v) for v in tta_views(x, 4, "characters")]).mean(0)
    torch.testing.assert_close(embed_tta(embed, x, 4, "characters"), want)
    torch.testing.assert_close(embed_tta(embed, x, 1, "characters"), embed(x))


def _tiny_model_and_images() -> tuple[torch.nn.Module, Preprocess, object]:
    from fewshot_studio.data.in_memory import InMemoryImages
    from fewshot_studio.models import create_backbone, create_method

    torch.manual_seed(0)
    model = create_method("protonet", create_backbone("conv4", in_channels=1, image_size=28,
                                                      hidden=8)).eval()
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (24, 1, 28, 28), generator=g, dtype=torch.uint8)
    data = InMemoryImages(images, torch.arange(6).repeat_interleave(4),
                          [f"c{i}" for i in range(6)])
    return model, Preprocess(28, 1), data


def test_evaluation_uses_the_averaged_features() -> None:
    model, pre, data = _tiny_model_and_images()
    dev = torch.device("cpu")
    plain = embed_all(model, data.images, pre, dev)
    tta = embed_all(model, data.images, pre, dev, tta=4)
    x = (data.images.float() / 255 - 0.0) / 1.0
    torch.testing.assert_close(tta, embed_tta(model.embed, x, 4, "characters"))
    assert not torch.allclose(plain, tta)
    r = evaluate(model, data, pre, way=3, shot=1, query=3, episodes=20, seed=0, tta=4)
    assert r.tta == 4 and r.to_dict()["tta"] == 4 and "TTA x4" in str(r)
    assert "tta" not in evaluate(model, data, pre, 3, 1, 3, 20, seed=0).to_dict()


def test_engine_caches_averaged_features_under_their_own_key(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "tiny.safetensors")
    support_root, query_root, truth, _ = make_label_folders(tmp_path)
    support = {c: sorted((support_root / c).glob("*.png")) for c in COLOURS}
    queries = [query_root / rel for rel in sorted(truth)]
    cache = tmp_path / "cache.sqlite"
    settings = LabelSettings(unknown_rule="threshold", unknown_threshold=0.0, batch_size=4,
                             tta=True)
    with LabelingSession(ckpt, settings, cache_path=cache) as s:
        s.set_support(support)
        list(s.run(queries))
        key = s.embedding.feature_id()
        assert key.endswith(":tta2")  # RGB: the image and its mirror
        got = s.embedding.cache.lookup(key, [FileKey.of(queries[0])])[str(queries[0])].feature
        x = s.embedding.decode(str(queries[0]))
        b = s.embedding.embedder
        assert b is not None and not isinstance(x, str)
        want = (b.embed(x[None]) + b.embed(x[None, ..., ::-1].copy())) / 2
        np.testing.assert_allclose(got, want[0], rtol=2e-3, atol=2e-3)  # fp16 in the cache
        for p in s.predictions():
            assert p.label == truth[p.path.relative_to(query_root).as_posix()]
    with LabelingSession(ckpt, LabelSettings(batch_size=4), cache_path=cache) as s:
        s.set_support(support)
        list(s.run(queries))
        assert s.counters.embedded == len(queries) + 9  # no TTA: not the TTA features


def test_cli_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fewshot_studio.cli import main

    ckpt = make_checkpoint(tmp_path / "tiny.safetensors")
    support_root, query_root, _, _ = make_label_folders(tmp_path)
    out = tmp_path / "labels.csv"
    assert main(["label", "--checkpoint", str(ckpt), "--support", str(support_root),
                 "--query", str(query_root), "--out", str(out), "--tta",
                 "--cache", str(tmp_path / "c.sqlite")]) == 0
    assert out.read_text().count("\n") > 5
    assert main(["eval", "--checkpoint", str(ckpt), "--data", str(support_root), "--way", "3",
                 "--shot", "1", "--query", "2", "--episodes", "5", "--tta"]) == 0
    assert "TTA x2" in capsys.readouterr().out  # photos: the image and its mirror
