"""Every registered method trains with its default arguments on every registered trainable
backbone (``fewshot-studio train --method M --backbone B``, no ``--method-arg``/``--backbone-arg``),
and its checkpoint rebuilds from its spec and predicts as the trained model did."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fixtures_train import make_glyphs, one_thread  # noqa: F401 (autouse fixture)

from fewshot_studio.cli import main
from fewshot_studio.io.checkpoint import load_checkpoint
from fewshot_studio.models import BACKBONES, METHODS
from fewshot_studio.models.layers import batch_stat_norms, has_running_stats


@pytest.fixture(scope="module")
def glyphs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pair_glyphs")
    make_glyphs(root, n_classes=6, n_per_class=4, size=32, seed=2)
    return root


TRAINABLE = [e.name for e in BACKBONES.entries() if e.cfg.trainable]


def test_the_pairs_cover_the_known_methods_and_backbones() -> None:
    assert {"protonet", "relation", "maml"} <= set(METHODS.names())
    assert {"conv4", "resnet12", "efficientnet_lite0"} <= set(TRAINABLE)


@pytest.mark.parametrize("backbone", TRAINABLE)
@pytest.mark.parametrize("method", METHODS.names())
def test_every_method_trains_on_every_backbone_with_defaults(
        method: str, backbone: str, glyphs: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    argv = ["train", "--method", method, "--backbone", backbone, "--data", str(glyphs),
            "--image-size", "32", "--split", "none", "--way", "2", "--shot", "1",
            "--query", "1", "--episodes", "2", "--val-every", "2", "--val-episodes", "1",
            "--val-way", "2", "--val-query", "1", "--device", "cpu", "--out", str(out)]
    assert main(argv) == 0
    ckpt = load_checkpoint(out / "last.safetensors")
    assert ckpt.model["method"] == method and ckpt.model["backbone"] == backbone
    model = ckpt.build("cpu")  # strict load: the spec rebuilds exactly these weights
    if method == "maml":  # full MAML by default: a backbone with batch statistics
        assert ckpt.model["backbone_config"]["track_running_stats"] is False
        assert batch_stat_norms(model.backbone) and not has_running_stats(model.backbone)
    g = torch.Generator().manual_seed(0)
    pre = ckpt.preprocess
    x = torch.randn(5, pre.channels, 32, 32, generator=g)
    labels = torch.tensor([0, 1])
    with torch.enable_grad() if model.fit_needs_grad else torch.no_grad():
        feats = model.embed(x)
        logits = model.fit(feats[:2], labels, 2)(feats[2:])
    assert logits.shape == (3, 2) and torch.isfinite(logits).all()
