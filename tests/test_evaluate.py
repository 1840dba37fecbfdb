"""Episodic evaluation: the CI formula, exact results on models whose answers are known,
determinism for a seed, and the ``eval`` command."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_train import make_glyphs, one_thread  # noqa: F401 (autouse fixture)
from torch import nn

from fewshot_studio.cli import main
from fewshot_studio.data.datasets import InMemoryImages
from fewshot_studio.data.preprocess import Preprocess
from fewshot_studio.io.checkpoint import Checkpoint, read_metadata, save_checkpoint
from fewshot_studio.models import create_method, model_spec
from fewshot_studio.models import functional as Fn
from fewshot_studio.models.backbones import Conv4
from fewshot_studio.training import evaluate as ev
from fewshot_studio.training.evaluate import (
    EvalResult,
    confidence_interval,
    default_query,
    evaluate,
)

PRE = Preprocess(image_size=8, channels=1)


def coded_images(n_classes: int = 8, per_class: int = 20) -> InMemoryImages:
    """Images whose every pixel is a class code: identical within a class."""
    targets = torch.arange(n_classes).repeat_interleave(per_class)
    images = (targets * 25 + 10).to(torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 8, 8)
    return InMemoryImages(images.contiguous(), targets, [f"c{i}" for i in range(n_classes)])


class Constant(nn.Module):
    """A backbone that ignores its input: every image gets the same features."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ones(x.shape[0], 4)


def test_ci_formula_is_1_96_sigma_over_sqrt_n() -> None:
    accs = [0.9, 1.0, 0.8, 0.95, 0.85]
    mean, ci = confidence_interval(accs)
    a = np.array(accs)
    hand = 1.96 * math.sqrt(((a - a.mean()) ** 2).sum() / len(a)) / math.sqrt(len(a))
    assert mean == pytest.approx(0.9)
    assert ci == pytest.approx(hand)
    assert confidence_interval([0.5] * 7) == (0.5, 0.0)
    r = EvalResult(0.98523, 0.00214, 1000)
    assert str(r) == "accuracy: 98.52% +- 0.21% (95% CI, 1000 episodes)"


def test_omniglot_query_protocol() -> None:
    assert default_query(1, 20) == 15
    assert default_query(5, 20) == 15
    assert default_query(10, 20) == 10  # 20 - K for K > 5


def test_perfect_and_blind_models_score_exactly() -> None:
    images = coded_images()
    perfect = create_method("protonet", nn.Flatten())
    r = evaluate(perfect, images, PRE, way=5, shot=1, query=3, episodes=40, seed=0)
    assert r.accuracy == 1.0 and r.ci95 == 0.0 and r.n == 40 and len(r.per_episode) == 40
    blind = create_method("protonet", Constant())  # all logits tie -> always class 0
    r = evaluate(blind, images, PRE, way=5, shot=2, query=3, episodes=10, seed=0)
    assert r.accuracy == pytest.approx(1 / 5) and r.ci95 == 0.0


def test_deterministic_for_a_seed_and_cache_agrees(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    images = InMemoryImages(torch.randint(0, 256, (10 * 12, 1, 16, 16), dtype=torch.uint8),
                            torch.arange(10).repeat_interleave(12), [str(i) for i in range(10)])
    model = create_method("protonet", Conv4(1, 16, hidden=8)).eval()
    pre = Preprocess(image_size=16, channels=1)
    a = evaluate(model, images, pre, 5, 1, 5, 30, seed=3)
    b = evaluate(model, images, pre, 5, 1, 5, 30, seed=3)
    c = evaluate(model, images, pre, 5, 1, 5, 30, seed=4)
    assert a.per_episode == b.per_episode
    assert a.per_episode != c.per_episode
    monkeypatch.setattr(ev, "FEATURE_CACHE_BYTES", 0)  # embed per episode instead
    d = evaluate(model, images, pre, 5, 1, 5, 30, seed=3)
    np.testing.assert_allclose(d.per_episode, a.per_episode, atol=1e-6)


def test_maml_fit_runs_its_inner_loop_under_evaluation() -> None:
    images = coded_images()
    model = create_method("maml", Conv4(1, 8, hidden=4, pool_layers=2, track_running_stats=False),
                          inner_steps=1)
    r = evaluate(model, images, PRE, way=3, shot=1, query=2, episodes=3, seed=0)
    assert r.n == 3 and 0.0 <= r.accuracy <= 1.0


@pytest.fixture(scope="module")
def checkpoint_and_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("evaldata")
    data = root / "glyphs"
    make_glyphs(data, n_classes=8, n_per_class=8)
    pre = Preprocess(image_size=28, channels=1)
    torch.manual_seed(0)
    backbone = Conv4(1, 28, hidden=16)
    model = create_method("protonet", backbone)
    path = save_checkpoint(root / "model.safetensors", Checkpoint(
        model=model_spec(model, "conv4", backbone.config()), preprocess=pre,
        state_dict=model.state_dict(), name="tiny"), dtype=torch.float16)
    return path, data


LINE = re.compile(r"^accuracy: \d+\.\d\d% \+- \d+\.\d\d% \(95% CI, 50 episodes\)$", re.M)


def test_eval_command_prints_and_records(checkpoint_and_data: tuple[Path, Path],
                                         capsys: pytest.CaptureFixture[str]) -> None:
    ckpt, data = checkpoint_and_data
    args = ["eval", "--checkpoint", str(ckpt), "--data", str(data), "--way", "5", "--shot",
            "1", "--episodes", "50", "--seed", "0", "--device", "cpu"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert LINE.search(first)
    assert main([*args, "--write-results", "--label", "glyphs"]) == 0
    second = capsys.readouterr().out
    assert LINE.search(second).group(0) == LINE.search(first).group(0)  # deterministic
    meta = read_metadata(ckpt)
    rec = meta["evaluation"]["glyphs 5w1s"]
    assert rec["episodes"] == 50 and rec["query"] == 7 and rec["seed"] == 0  # 8 images - 1
    shown = float(LINE.search(first).group(0).split("%")[0].split()[-1])
    assert 100 * rec["accuracy"] == pytest.approx(shown, abs=0.006)
    from safetensors import safe_open

    with safe_open(str(ckpt), framework="pt") as f:  # still fp16 after recording
        assert {f.get_slice(k).get_dtype() for k in f.keys()} >= {"F16"}  # noqa: SIM118


def test_eval_command_bad_inputs(checkpoint_and_data: tuple[Path, Path], tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    ckpt, data = checkpoint_and_data
    assert main(["eval", "--checkpoint", str(ckpt), "--data", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and err.count("\n") == 1
    assert main(["eval", "--checkpoint", str(ckpt), "--data", str(data), "--way", "9"]) == 2
    assert "9-way" in capsys.readouterr().err


def test_transductive_evaluation_refines_each_episode_over_its_queries() -> None:
    """``transductive=k``: each episode's predictor is refined by k soft k-means iterations
    over that episode's queries before scoring them (checked against the functional
    refinement written out); methods without refinement refuse it."""
    torch.manual_seed(0)
    images = InMemoryImages(torch.randint(0, 256, (8 * 10, 1, 16, 16), dtype=torch.uint8),
                            torch.arange(8).repeat_interleave(10), [str(i) for i in range(8)])
    model = create_method("protonet", Conv4(1, 16, hidden=8)).eval()
    pre = Preprocess(image_size=16, channels=1)
    got = evaluate(model, images, pre, 5, 1, 4, 20, seed=1, transductive=2)
    assert got.transductive == 2 and got.to_dict()["transductive"] == 2
    assert "transductive x2" in str(got)
    eps, _ = ev.fixed_episodes(images, 5, 1, 4, 20, seed=1)
    expected = []
    with torch.no_grad():
        for e in eps:
            s = model.embed(ev._normalize(images.images[e.support], pre))
            q = model.embed(ev._normalize(images.images[e.query], pre))
            protos = Fn.soft_kmeans_refine(Fn.prototypes(s, e.support_labels, 5), s,
                                           e.support_labels, q, n_iters=2)
            logits = Fn.squared_euclidean_logits(q, protos)
            expected.append((logits.argmax(-1) == e.query_labels).float().mean().item())
    np.testing.assert_allclose(got.per_episode, expected, atol=1e-6)
    plain = evaluate(model, images, pre, 5, 1, 4, 20, seed=1)
    assert plain.per_episode != got.per_episode and "transductive" not in plain.to_dict()
    relation = create_method("relation", Conv4(1, 16, hidden=8, pool_layers=2),
                             aggregate="sum")  # sums of shots: nothing to refine
    with pytest.raises(ValueError, match="transductive"):
        evaluate(relation, images, pre, 5, 1, 4, 2, transductive=1)


def test_eval_command_transductive_records_under_its_own_key(
        checkpoint_and_data: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    from fewshot_studio.engine.head import TRANSDUCTIVE_ITERS

    ckpt, data = checkpoint_and_data
    args = ["eval", "--checkpoint", str(ckpt), "--data", str(data), "--way", "5", "--shot",
            "1", "--episodes", "20", "--seed", "0", "--device", "cpu", "--write-results",
            "--label", "glyphs"]
    assert main([*args, "--transductive"]) == 0
    assert f"transductive x{TRANSDUCTIVE_ITERS})" in capsys.readouterr().out
    rec = read_metadata(ckpt)["evaluation"][f"glyphs transductive x{TRANSDUCTIVE_ITERS} 5w1s"]
    assert rec["transductive"] == TRANSDUCTIVE_ITERS and rec["episodes"] == 20


def test_recorded_label_names_the_data_classes_and_protocol() -> None:
    from fewshot_studio.training.records import eval_label, result_key

    label = eval_label(None, ["/d/images_background.zip", "/d/images_evaluation.zip"],
                       "splits/vinyals_test.txt", within_alphabet=True, tta=8, transductive=2)
    assert label == ("images_background+images_evaluation [vinyals_test] within-alphabet "
                     "TTA x8 transductive x2")
    assert eval_label("omniglot-evaluation", ["x.zip"], None) == "omniglot-evaluation"
    assert result_key(label, 20, 1).endswith(" transductive x2 20w1s")
