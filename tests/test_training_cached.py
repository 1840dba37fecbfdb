"""The trainer's cached-feature mode (``training/cached.py``, the cpu budget's photo models):
the trainer's schedule per parameter group, the best validated weights kept, evaluation on
cached features."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from fixtures_train import one_thread  # noqa: F401 (autouse fixture)

from fewshot_studio.models import create_backbone, create_method
from fewshot_studio.models.base import FewShotClassifier
from fewshot_studio.training import cached
from fewshot_studio.training.steps import lr_at


def tiny_model() -> FewShotClassifier:
    """A cosine ProtoNet whose "backbone" takes (n, 4, 8, 8) cached trunk outputs."""
    torch.manual_seed(0)
    bb = create_backbone("conv4", in_channels=4, image_size=8, hidden=4, pool_layers=2)
    return create_method("protonet", bb, distance="cosine", learn_scale=True)


def features(n_classes: int = 6, per_class: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, 4, 8, 8)`` features, each class a distinct pattern plus a little noise."""
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(n_classes, 4, 8, 8, generator=g)
    targets = torch.arange(n_classes).repeat_interleave(per_class)
    return centres[targets] + 0.05 * torch.randn(len(targets), 4, 8, 8, generator=g), targets


def groups(model: FewShotClassifier) -> list[list[torch.nn.Parameter]]:
    own = [p for n, p in model.named_parameters() if not n.startswith("backbone.")]
    return [list(model.backbone.parameters()), own]


def run(model: FewShotClassifier, config: cached.CachedTrainConfig, validate: Any
        ) -> cached.CachedTrainResult:
    x, y = features()
    result = None
    for p in cached.train_on_features(model, groups(model), x, y, config, validate):
        if isinstance(p.payload, cached.CachedTrainResult):
            result = p.payload
    assert result is not None
    return result


def test_keeps_the_best_validated_weights() -> None:
    model = tiny_model()
    scores = iter([0.5, 0.9, 0.1])  # step 0, 2, 4
    seen: list[dict[str, torch.Tensor]] = []

    def validate() -> float:
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        return next(scores)

    config = cached.CachedTrainConfig(way=3, shots=(1,), query=2, steps=4, lrs=(1e-2, 1e-2),
                                      val_every=2)
    result = run(model, config, validate)
    assert (result.best, result.best_step, result.steps_run) == (0.9, 2, 4)
    assert [r["step"] for r in result.rows] == [0, 2, 4]
    assert any(not torch.equal(seen[1][k], seen[0][k]) for k in seen[0])  # it trained
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, seen[1][k], rtol=0, atol=0)


def test_each_group_follows_the_trainers_cosine_schedule(
        monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[float]] = []
    real_step = cached.train_step

    def recording_step(step_module: Any, opt: torch.optim.Optimizer, *a: Any, **k: Any) -> Any:
        seen.append([g["lr"] for g in opt.param_groups])
        assert k["grad_clip"] == 5.0
        return real_step(step_module, opt, *a, **k)

    monkeypatch.setattr(cached, "train_step", recording_step)
    config = cached.CachedTrainConfig(way=3, shots=(1, 2), query=2, steps=5, lrs=(1e-3, 2e-2),
                                      val_every=10)
    run(tiny_model(), config, lambda: 0.0)
    expected = [[lr_at(config.schedule(lr), step) for lr in config.lrs]
                for step in range(1, 6)]
    assert seen == expected
    assert seen[-1] == pytest.approx([1e-5, 2e-4])  # the schedule's floor at the last step
    assert seen[0][0] < 1e-3 and seen[0][1] / seen[0][0] == pytest.approx(20)


def test_evaluate_features_on_separable_features() -> None:
    model = tiny_model()
    model.train()
    x, y = features()
    r = cached.evaluate_features(model, x, y, way=3, shot=1, episodes=5, seed=0, query=4)
    assert r.accuracy == 1.0 and r.n == 5 and (r.way, r.shot, r.query) == (3, 1, 4)
    assert model.training  # restored
    noisy = x + 5.0 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    assert cached.evaluate_features(model, noisy, y, 3, 1, 5, 0, 4).accuracy < 0.9
