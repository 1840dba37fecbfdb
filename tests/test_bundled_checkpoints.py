"""Every bundled checkpoint loads, builds and classifies a small fixed set of real episodes far
above chance: Omniglot-evaluation characters for the 1-channel (Omniglot) models, Caltech-101
test classes for the photo models. A damaged file, a wrong preprocessing spec or a broken
method contract fails here. Needs ../shared/data; a dataset's part is skipped without it.

Cost: Omniglot 20 classes x 5 images at 28 px; Caltech 5 classes x 4 images at 224 px
(embedded once per checkpoint, then every image takes a turn as the support example).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch

from fewshot_studio.data.datasets import default_data_dir, open_dataset
from fewshot_studio.data.images import load_and_preprocess
from fewshot_studio.data.preprocess import Preprocess
from fewshot_studio.io.checkpoint import load_checkpoint, read_metadata
from fewshot_studio.paths import bundled_checkpoints, resources_dir

BUNDLED = bundled_checkpoints()
EXPECTED = ("omniglot-protonet", "omniglot-relation", "omniglot-maml", "natural-protonet",
            "natural-relation", "natural-maml")  # must always ship
OMNIGLOT_WAY, OMNIGLOT_PER_CLASS = 20, 5
CALTECH_WAY, CALTECH_PER_CLASS = 5, 4
# Floors far above chance (5% at 20-way, 20% at 5-way) and well below what the models measure
# on the full protocols (checkpoints/README.md), so that only real damage trips them.
OMNIGLOT_FLOOR = 0.60
CALTECH_FLOOR = 0.60


def _omniglot_zip() -> Path:
    return default_data_dir() / "omniglot" / "images_evaluation.zip"


def _caltech_zip() -> Path:
    return default_data_dir() / "caltech101" / "caltech101.zip"


@cache
def _members(kind: str) -> tuple[tuple[tuple[str, ...], ...], str]:
    """Fixed members per class: ``((class0 members), ...), zip path``."""
    if kind == "omniglot":
        ds = open_dataset(_omniglot_zip())
        names = ds.class_names[:: len(ds.class_names) // OMNIGLOT_WAY][:OMNIGLOT_WAY]
        per = OMNIGLOT_PER_CLASS
    else:
        test = (resources_dir() / "splits" / "caltech101_test.txt").read_text().split()
        ds = open_dataset(_caltech_zip(), classes=test)
        names = test[:: len(test) // CALTECH_WAY][:CALTECH_WAY]
        per = CALTECH_PER_CLASS
    by_class: dict[int, list[str]] = {}
    for member, label in ds.samples:
        by_class.setdefault(label, []).append(member)
    index = {n: i for i, n in enumerate(ds.class_names)}
    return tuple(tuple(sorted(by_class[index[n]])[:per]) for n in names), str(ds.root)


@cache
def _images(kind: str, pre: Preprocess) -> tuple[torch.Tensor, torch.Tensor]:
    """``(n, C, H, W)`` preprocessed images and ``(n,)`` labels, class-major."""
    members, root = _members(kind)
    ds = open_dataset(root)
    xs, ys = [], []
    for label, group in enumerate(members):
        for m in group:
            xs.append(load_and_preprocess(ds.read_bytes(m), pre))
            ys.append(label)
    return torch.from_numpy(np.stack(xs)), torch.tensor(ys)


def _one_shot_accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                       per_class: int) -> float:
    """Embed once; episode j takes image j of every class as the 1-shot support and the
    others as queries; mean accuracy over all episodes."""
    with torch.no_grad():
        feats = model.embed(x)
    n_way = int(y.max()) + 1
    correct = total = 0
    for j in range(per_class):
        s = torch.arange(n_way) * per_class + j
        q = torch.tensor([i for i in range(len(y)) if i % per_class != j])
        with torch.enable_grad() if model.fit_needs_grad else torch.no_grad():
            logits = model.fit(feats[s], y[s], n_way)(feats[q]).detach()
        correct += int((logits.argmax(-1) == y[q]).sum())
        total += len(q)
    return correct / total


def test_expected_checkpoints_are_bundled() -> None:
    for name in EXPECTED:
        assert name in BUNDLED, f"{name} missing from checkpoints/"


@pytest.mark.parametrize("name", sorted(BUNDLED))
def test_bundled_checkpoint_metadata(name: str) -> None:
    meta = read_metadata(BUNDLED[name])
    assert meta["name"] == name
    assert meta["description"]
    assert BUNDLED[name].stat().st_size < 25_000_000
    pre = meta["preprocess"]
    if pre["channels"] == 3:  # EfficientNet-Lite0's own normalisation and crop
        assert pre["image_size"] == 224 and pre["resize"] == "center_crop"
        assert tuple(pre["mean"]) == (0.5, 0.5, 0.5) and tuple(pre["std"]) == (0.5, 0.5, 0.5)


@pytest.mark.parametrize("name", sorted(BUNDLED))
def test_bundled_checkpoint_classifies_real_episodes(name: str) -> None:
    torch.manual_seed(0)
    ckpt = load_checkpoint(BUNDLED[name])
    model = ckpt.build("cpu")
    if ckpt.preprocess.channels == 1:
        if not _omniglot_zip().is_file():
            pytest.skip(f"no Omniglot data at {_omniglot_zip()}")
        kind, per, floor = "omniglot", OMNIGLOT_PER_CLASS, OMNIGLOT_FLOOR
    else:
        if not _caltech_zip().is_file():
            pytest.skip(f"no Caltech-101 data at {_caltech_zip()}")
        kind, per, floor = "caltech", CALTECH_PER_CLASS, CALTECH_FLOOR
    x, y = _images(kind, ckpt.preprocess)
    acc = _one_shot_accuracy(model, x, y, per)
    assert acc >= floor, f"{name}: {100 * acc:.1f}% on fixed {kind} episodes (< {floor:.0%})"
