"""The many-shot head (``adapt``), the choice between it and the prototypes, and the adaptive
unknown rule, on constructed features and on a tiny generated checkpoint."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_fixtures import COLOURS, colour_image, make_checkpoint
from PIL import Image
from torch import Tensor, nn

from fewshot_studio.engine import export
from fewshot_studio.engine.api import LabelSettings, Status
from fewshot_studio.engine.head import adapt_to_support, is_unknown
from fewshot_studio.engine.session import LabelingSession
from fewshot_studio.errors import UserError
from fewshot_studio.models import create_method
from fewshot_studio.models import functional as Fn
from fewshot_studio.models.protonet import LinearPredictor, ProtoNet


def _skewed(n_per_class: int, seed: int) -> tuple[Tensor, Tensor]:
    """Two classes told apart by feature 1 (+-0.5) only; feature 0 spreads widely and its
    class means differ (0-10 vs 3-13), which pulls the prototypes' boundary astray."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(2).repeat_interleave(n_per_class)
    spread = 10 * torch.rand(2 * n_per_class, generator=g) + 3.0 * y
    x = torch.stack([spread, 0.5 - y.float()], dim=1)
    return x, y


def _euclidean() -> ProtoNet:
    model = create_method("protonet", nn.Identity(), distance="euclidean")
    assert isinstance(model, ProtoNet)
    return model


def _accuracy(predictor: object, x: Tensor, y: Tensor) -> float:
    return float((predictor(x).argmax(-1) == y).float().mean())  # type: ignore[operator]


def test_support_folds_leave_one_out_and_keep_every_class() -> None:
    y = torch.tensor([0, 0, 0, 1, 1, 2])
    folds = Fn.support_folds(y, 3)
    assert folds.shape == (3, 6)
    assert folds.sum(0).tolist() == [1, 1, 1, 1, 1, 0]  # the lone example is never held out
    for held in folds:
        assert set(y[~held].tolist()) == {0, 1, 2}
    assert Fn.support_folds(torch.arange(4), 4).shape == (0, 4)  # one example a class


def test_head_starts_as_the_prototypes() -> None:
    """With no descent step the head's logits are the prototypes' (both distances)."""
    x, y = _skewed(6, 0)
    for model in (_euclidean(), create_method("protonet", nn.Identity(), distance="cosine")):
        head, _ = model.fit_head(x, y, 2, Fn.support_folds(y, 2), 1e-4, 0)
        torch.testing.assert_close(head(x), model.fit(x, y, 2)(x), atol=1e-4, rtol=1e-5)


def test_head_fits_separable_features_where_prototypes_fail() -> None:
    model = _euclidean()
    x, y = _skewed(20, 0)
    qx, qy = _skewed(200, 1)
    head, _ = model.fit_head(x, y, 2, Fn.support_folds(y, 2), 1e-4, 100)
    assert isinstance(head, LinearPredictor)
    protos = model.fit(x, y, 2)
    assert _accuracy(head, x, y) == 1.0
    assert _accuracy(head, qx, qy) >= 0.95
    assert _accuracy(head, qx, qy) > _accuracy(protos, qx, qy) + 0.15


def test_auto_chooses_the_head_when_held_out_examples_say_so() -> None:
    model = _euclidean()
    x, y = _skewed(20, 0)
    adapted = adapt_to_support(model, x, y, 2, "auto")
    assert adapted.kind == "head"
    assert adapted.heldout_prob.shape == (40,)  # every example held out once
    assert adapt_to_support(model, x, y, 2, "none").kind == "prototypes"


class _BackwardHead(ProtoNet):
    """A ProtoNet whose head is wrong on purpose: its logits are the prototypes', negated."""

    def fit_head(self, support_features: Tensor, support_labels: Tensor, n_way: int,
                 held_out: Tensor, l2: float, steps: int) -> tuple[LinearPredictor, Tensor]:
        head, logits = super().fit_head(support_features, support_labels, n_way, held_out,
                                        l2, 0)
        return LinearPredictor(-head.weight, -head.bias, self), -logits


def test_auto_keeps_the_prototypes_when_held_out_examples_say_so() -> None:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(3).repeat_interleave(5)
    x = 4 * torch.eye(3)[y] + 0.3 * torch.randn(15, 3, generator=g)
    model = _BackwardHead(nn.Identity(), distance="euclidean")
    assert adapt_to_support(model, x, y, 3, "auto").kind == "prototypes"
    assert adapt_to_support(model, x, y, 3, "head").kind == "head"  # asked for: no choice
    # one example a class: nothing to hold out, auto keeps the prototypes
    assert adapt_to_support(_euclidean(), x[::5], y[::5], 3, "auto").kind == "prototypes"


def test_head_is_declared_not_probed() -> None:
    assert ProtoNet.linear_head
    backbone = nn.Identity()
    backbone.feature_shape = (8,)  # type: ignore[assignment]
    relation = create_method("relation", backbone, module="mlp", hidden=8)
    assert not relation.linear_head
    x = torch.randn(6, 8)
    y = torch.arange(2).repeat(3)
    with torch.enable_grad():
        assert adapt_to_support(relation, x, y, 2, "head").kind == "prototypes"


def _rule_unknown(adapted: object, q: Tensor, miss_rate: float) -> np.ndarray:
    """The engine's adaptive decision for ``(n, d)`` queries."""
    logits = adapted.predictor(q)  # type: ignore[attr-defined]
    top = adapted.prototypes(q).max(-1).values  # type: ignore[attr-defined]
    return is_unknown(torch.softmax(logits, -1).max(-1).values.numpy(),
                      adapted.typicality(top).numpy(),  # type: ignore[attr-defined]
                      adapted.min_prob(), miss_rate)  # type: ignore[attr-defined]


@pytest.mark.parametrize("adapt", ["none", "head"])
def test_adaptive_rule_rejects_far_queries_and_keeps_known_ones(adapt: str) -> None:
    g = torch.Generator().manual_seed(0)
    centres = 5 * torch.eye(4)[:3]
    y = torch.arange(3).repeat_interleave(8)
    x = centres[y] + 0.5 * torch.randn(24, 4, generator=g)
    qy = torch.arange(3).repeat_interleave(40)
    known = centres[qy] + 0.5 * torch.randn(120, 4, generator=g)
    far = torch.tensor([[0.0, 0.0, 0.0, 6.0], [-5.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, -9.0],
                        [40.0, 0.0, 0.0, 0.0]])
    adapted = adapt_to_support(_euclidean(), x, y, 3, adapt)
    assert adapted.kind == ("prototypes" if adapt == "none" else "head")
    unknown = _rule_unknown(adapted, torch.cat([known, far]), miss_rate=0.1)
    assert unknown[-4:].all()
    assert unknown[:-4].mean() <= 0.2
    assert not _rule_unknown(adapted, known, miss_rate=0.0).any()  # no miss allowed
    # every class with one example: nothing held out, the fixed threshold applies
    assert not adapt_to_support(_euclidean(), x[::8], y[::8], 3, "none").has_heldout


def test_conformal_pvalues_and_precision_threshold() -> None:
    calibration = torch.arange(5.0)  # held-out scores 0..4
    p = Fn.conformal_pvalues(calibration, torch.tensor([-1.0, 0.0, 2.5, 9.0]))
    torch.testing.assert_close(p, torch.tensor([1, 2, 4, 6]) / 6.0)
    prob = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
    right = torch.tensor([True, True, True, False, False])
    assert Fn.precision_threshold(prob, right, 0.9) == pytest.approx(0.7)  # top 3 all right
    assert Fn.precision_threshold(prob, torch.ones(5, dtype=torch.bool), 0.9) == 0.0
    assert Fn.precision_threshold(prob, torch.zeros(5, dtype=torch.bool), 0.9) == 1.0


# -- the session --------------------------------------------------------------------------


def _write(img: Image.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("adapt")
    support = {c: [_write(colour_image(c, 100 + i), root / "support" / c / f"{i}.png")
                   for i in range(6)] for c in COLOURS}
    known = {_write(colour_image(c, i), root / "query" / f"{c}_{i}.png"): c
             for c in COLOURS for i in range(10)}
    rng = np.random.default_rng(0)
    far = [_write(Image.new("RGB", (48, 36), (0, 0, 0)), root / "query" / "far_black.png"),
           _write(Image.new("RGB", (48, 36), (255, 255, 255)), root / "query" / "far_white.png"),
           _write(Image.fromarray(rng.integers(0, 256, (36, 48, 3), dtype=np.uint8)),
                  root / "query" / "far_noise.png")]
    return {"root": root, "ckpt": make_checkpoint(root / "tiny.safetensors"),
            "support": support, "known": known, "far": far, "cache": root / "cache.sqlite"}


ADAPTIVE = LabelSettings(unknown_rule="adaptive")


def _label(folders: dict, settings: LabelSettings) -> tuple[dict[Path, object], str]:
    with LabelingSession(folders["ckpt"], settings, cache_path=folders["cache"],
                         backend="torch") as s:
        s.set_support(folders["support"])
        list(s.run([*folders["known"], *folders["far"]]))
        return {p.path: p for p in s.predictions()}, s.head_kind


def test_session_adaptive_rule_marks_far_images_unknown(folders: dict) -> None:
    preds, _ = _label(folders, ADAPTIVE)
    assert all(preds[p].status == Status.UNKNOWN for p in folders["far"])  # type: ignore
    kept = [preds[p] for p in folders["known"]]
    assert sum(p.status == Status.OK for p in kept) >= 0.8 * len(kept)  # type: ignore
    assert all(p.label == folders["known"][p.path] for p in kept  # type: ignore
               if p.status == Status.OK)  # type: ignore
    # the fixed rule at threshold 0 labels everything, far images included
    everything, _ = _label(folders, LabelSettings(unknown_rule="threshold",
                                                  unknown_threshold=0.0))
    assert all(p.status == Status.OK for p in everything.values())  # type: ignore


def test_session_adapt_modes_and_a_miss_rate_change_needs_no_fit(folders: dict) -> None:
    for adapt, kind in (("none", "prototypes"), ("head", "head")):
        preds, got = _label(folders, LabelSettings(adapt=adapt))
        assert got == kind
        assert len(preds) == len(folders["known"]) + len(folders["far"])
    with LabelingSession(folders["ckpt"], ADAPTIVE, cache_path=folders["cache"],
                         backend="torch") as s:
        s.set_support(folders["support"])
        list(s.run([*folders["known"], *folders["far"]]))
        fits = dict(s.counters.extra)
        strict = s.set_settings(replace(ADAPTIVE, miss_rate=0.5))
        assert s.counters.extra == fits  # thresholds re-read, nothing refitted
        loose = s.set_settings(replace(ADAPTIVE, miss_rate=0.0))
        n_unknown = [sum(p.status == Status.UNKNOWN for p in ps) for ps in (strict, loose)]
        assert n_unknown[0] > n_unknown[1]
        with pytest.raises(UserError, match="adapt"):
            s.set_settings(LabelSettings(adapt="sometimes"))


def test_output_schema_unchanged(folders: dict, tmp_path: Path) -> None:
    preds, _ = _label(folders, ADAPTIVE)
    rows = sorted(preds.values(), key=lambda p: p.path)  # type: ignore[attr-defined]
    export.write_csv(rows, tmp_path / "out.csv", folders["root"])  # type: ignore[arg-type]
    export.write_json(rows, tmp_path / "out.json", folders["root"])  # type: ignore[arg-type]
    with open(tmp_path / "out.csv", newline="", encoding="utf-8") as f:
        header = next(csv.reader(f))
    assert tuple(header) == export.CSV_COLUMNS == (
        "path", "label", "confidence", "margin", "status", "error", "top1", "top1_prob",
        "top2", "top2_prob", "top3", "top3_prob", "corrected")
    doc = json.loads((tmp_path / "out.json").read_text(encoding="utf-8"))
    assert doc["format"] == export.JSON_FORMAT and doc["columns"] == list(export.CSV_COLUMNS)
    assert all(set(r) == set(export.CSV_COLUMNS) for r in doc["rows"])


def test_cli_label_rule_and_adapt_options(folders: dict, tmp_path: Path) -> None:
    from fewshot_studio.cli import main

    def label(out: Path, *extra: str) -> dict[str, dict[str, str]]:
        code = main(["label", "--checkpoint", str(folders["ckpt"]), "--support",
                     str(folders["root"] / "support"), "--query", str(folders["root"] / "query"),
                     "--out", str(out), "--cache", str(folders["cache"]), *extra])
        assert code == 0
        return {Path(r["path"]).name: r for r in export.read_csv(out)}

    # the adaptive rule: the far images come out unknown
    rows = label(tmp_path / "a.csv", "--unknown-rule", "adaptive", "--adapt", "head",
                 "--save-project", str(tmp_path / "a.fsproj"))
    assert all(rows[p.name]["status"] == "unknown" for p in folders["far"])
    from fewshot_studio.gui import project_io as pio

    saved = pio.load_project(tmp_path / "a.fsproj").settings
    assert (saved.unknown_rule, saved.adapt, saved.miss_rate) == ("adaptive", "head", 0.1)
    # the default is the fixed threshold, as in the app
    rows = label(tmp_path / "t.csv", "--unknown-threshold", "0")
    assert all(r["status"] == "ok" for r in rows.values())
    assert pio.LabelSettings().unknown_rule == "threshold"
    with pytest.raises(SystemExit):
        main(["label", "--checkpoint", "x", "--support", "s", "--query", "q", "--out", "o",
              "--adapt", "sometimes"])
