"""Suspicious class examples: leave-one-out predictions of the support set
(:func:`~fewshot_studio.engine.head.leave_one_out_logits`,
:meth:`LabelingSession.suspicious_examples`) on generated colour images."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from engine_fixtures import colour_image, make_checkpoint, make_support

from fewshot_studio.engine.api import LabelSettings
from fewshot_studio.engine.head import leave_one_out_logits
from fewshot_studio.engine.session import LabelingSession
from fewshot_studio.models import create_backbone, create_method

SETTINGS = LabelSettings(unknown_rule="threshold", unknown_threshold=0.0, batch_size=8)
# A random-init network's distances differ by little (probabilities near 1/3); a trained
# checkpoint's are far apart. Its calibration temperature stands in for the training.
SHARP = 0.01


def _sharp_checkpoint(path: Path) -> Path:
    from dataclasses import replace

    from fewshot_studio.io.checkpoint import CALIBRATION_KEY, load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(make_checkpoint(path.with_name("random.safetensors")))
    evaluation = {**ckpt.evaluation, CALIBRATION_KEY: {"temperature": SHARP}}
    return save_checkpoint(path, replace(ckpt, evaluation=evaluation))


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("suspicious")
    support = make_support(root / "support", per_class=3)
    stray = root / "support" / "green" / "stray_red.png"  # a red image among the green ones
    colour_image("red", 7).save(stray)
    lone = root / "lone_red.png"
    colour_image("red", 8).save(lone)
    return {"ckpt": _sharp_checkpoint(root / "sharp.safetensors"), "support": support,
            "stray": stray, "lone": lone, "cache": root / "cache.sqlite"}


def _suspicious(env: dict, support: dict[str, list[Path]]) -> tuple[dict[Path, str], int]:
    with LabelingSession(env["ckpt"], SETTINGS, cache_path=env["cache"]) as s:
        assert s.temperature == SHARP
        s.set_support(support)
        for _ in s.run([]):  # embeds the examples
            pass
        first = s.suspicious_examples()
        assert s.suspicious_examples() == first  # remembered: not computed again
        return first, s.counters.extra["suspicious_checks"]


def test_a_red_example_among_green_ones_looks_like_red(env: dict) -> None:
    support = {k: list(v) for k, v in env["support"].items()}
    support["green"].append(env["stray"])
    found, checks = _suspicious(env, support)
    assert found == {env["stray"].resolve(): "red"}
    assert checks == 1


def test_a_clean_support_set_flags_nothing(env: dict) -> None:
    found, _ = _suspicious(env, env["support"])
    assert found == {}


def test_a_single_example_class_is_never_flagged(env: dict) -> None:
    """Leaving out a class's only example would leave the class empty: skipped."""
    support = {k: list(v) for k, v in env["support"].items()}
    support["yellow"] = [env["lone"]]  # a red image as the only example of another class
    found, _ = _suspicious(env, support)
    assert env["lone"].resolve() not in found


def _tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_method("protonet", create_backbone("conv4", in_channels=3, image_size=32,
                                                     hidden=8)).eval()


def test_leave_one_out_is_fit_without_the_example() -> None:
    """Exact leave-one-out: each candidate's logits are those of ``fit`` on the others;
    single-example classes and non-candidates are skipped."""
    model = _tiny_model()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 12, generator=g)
    y = torch.tensor([0, 0, 0, 1, 1, 2, 0])
    candidates = torch.tensor([True, True, True, True, True, True, False])
    index, logits = leave_one_out_logits(model, x, y, 3, candidates)
    assert index.tolist() == [0, 1, 2, 3, 4]  # 5: class 2's only example; 6: not asked
    assert logits.shape == (5, 3)
    for row, i in enumerate(index.tolist()):
        keep = torch.arange(7) != i
        want = model.fit(x[keep], y[keep], 3)(x[i:i + 1])
        torch.testing.assert_close(logits[row:row + 1], want.detach())


def test_leave_one_out_past_the_budget_uses_stratified_folds() -> None:
    """More candidates than fits: every eligible example is still scored, by a fit that
    does not include it, in at most ``max_fits`` fits."""
    model = _tiny_model()
    calls = []
    fit = model.fit

    def counting_fit(xs: torch.Tensor, ys: torch.Tensor, n_way: int | None = None):
        calls.append(len(ys))
        return fit(xs, ys, n_way)

    model.fit = counting_fit  # type: ignore[method-assign]
    g = torch.Generator().manual_seed(2)
    x = torch.randn(12, 6, generator=g)
    y = torch.tensor([0] * 6 + [1] * 6)
    index, logits = leave_one_out_logits(model, x, y, 2, torch.ones(12, dtype=torch.bool),
                                         max_fits=3)
    assert index.tolist() == list(range(12)) and len(calls) == 3
    assert all(n == 8 for n in calls)  # each fold holds out 2 of each class
    # example 4 is scored by the fold that holds it out (with 1, 7 and 10)
    keep = torch.tensor([i % 3 != 1 for i in range(12)])  # 4 (rank 4 in class 0): fold 1
    want = model.fit(x[keep], y[keep], 2)(x[4:5])
    torch.testing.assert_close(logits[4:5], want.detach())
