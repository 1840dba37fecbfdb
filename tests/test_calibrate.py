"""Temperature scaling (Guo et al. 2017): the fit, the ECE, the engine applying it, and the
``calibrate`` command writing it into a checkpoint."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from engine_fixtures import COLOURS, colour_image, make_checkpoint, make_support
from safetensors import safe_open
from torch import nn

from fewshot_studio.cli import main
from fewshot_studio.data.in_memory import InMemoryImages
from fewshot_studio.data.preprocess import Preprocess
from fewshot_studio.data.scan import scan_images
from fewshot_studio.io.checkpoint import (
    CALIBRATION_KEY,
    load_checkpoint,
    read_metadata,
    save_checkpoint,
    temperature_from_metadata,
)
from fewshot_studio.models.protonet import ProtoNet
from fewshot_studio.training.calibrate import (
    expected_calibration_error,
    fit_temperature,
    fit_temperature_to_logits,
    nll,
)


def test_fit_recovers_a_known_temperature() -> None:
    """Labels drawn from softmax(z / 2.5): the NLL-optimal temperature is ~2.5."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(20000, 5, generator=g) * 6.0
    y = torch.multinomial(torch.softmax(z / 2.5, -1), 1, generator=g).squeeze(1)
    t = fit_temperature_to_logits(z, y)
    assert t == pytest.approx(2.5, rel=0.05)
    # it is the minimum of the NLL
    assert nll(z, y, t) < min(nll(z, y, t * 1.1), nll(z, y, t / 1.1))
    # calibrated already: T = 1 is (nearly) recovered
    y1 = torch.multinomial(torch.softmax(z, -1), 1, generator=g).squeeze(1)
    assert fit_temperature_to_logits(z, y1) == pytest.approx(1.0, rel=0.05)


def test_ece_by_hand() -> None:
    # two queries at confidence 0.9 (one right), one at 0.6 (right): bins 14 and 9
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6]])
    labels = torch.tensor([0, 1, 1])
    expected = (2 / 3) * abs(0.5 - 0.9) + (1 / 3) * abs(1.0 - 0.6)
    assert expected_calibration_error(probs, labels) == pytest.approx(expected)
    assert expected_calibration_error(torch.eye(3), torch.arange(3)) == pytest.approx(0.0)


def _blobs(n_classes: int = 12, per_class: int = 12, seed: int = 0) -> InMemoryImages:
    """uint8 (N, 1, 4, 4) images: a class mean plus heavy noise (classes overlap)."""
    g = torch.Generator().manual_seed(seed)
    means = torch.rand(n_classes, 1, 4, 4, generator=g) * 120 + 60
    x = means.repeat_interleave(per_class, 0)
    x = x + torch.randn(x.shape, generator=g) * 45
    targets = torch.arange(n_classes).repeat_interleave(per_class)
    return InMemoryImages(x.clamp(0, 255).to(torch.uint8), targets,
                          [f"c{i}" for i in range(n_classes)])


def test_overconfident_protonet_gets_t_above_one() -> None:
    model = ProtoNet(nn.Identity(), scale=10.0)  # squared distances x 10: far too sure
    pre = Preprocess(4, 1, (0.5,), (0.25,))
    r = fit_temperature(model, _blobs(), pre, way=5, shot=1, query=5, episodes=40, seed=0)
    assert 0.3 < r.accuracy < 0.98  # mistakes exist, so calibration is measurable
    assert r.temperature > 1.0
    assert r.ece_after < r.ece_before
    assert r.nll_after < r.nll_before
    # deterministic for a seed
    again = fit_temperature(model, _blobs(), pre, way=5, shot=1, query=5, episodes=40, seed=0)
    assert again.temperature == r.temperature


def test_temperature_from_metadata_defaults_to_one() -> None:
    assert temperature_from_metadata({}) == 1.0
    assert temperature_from_metadata({"x 5w1s": {"accuracy": 0.9}}) == 1.0
    assert temperature_from_metadata({CALIBRATION_KEY: {"temperature": -2}}) == 1.0
    assert temperature_from_metadata({CALIBRATION_KEY: {"temperature": 2.5}}) == 2.5
    assert temperature_from_metadata({CALIBRATION_KEY: {"temperature": "nan"}}) == 1.0


def _with_temperature(src: Path, dst: Path, t: float) -> Path:
    ckpt = load_checkpoint(src)
    ckpt.evaluation = {**ckpt.evaluation, CALIBRATION_KEY: {"temperature": t}}
    return save_checkpoint(dst, ckpt)


def test_engine_applies_temperature(tmp_path: Path) -> None:
    from fewshot_studio.engine.api import LabelSettings
    from fewshot_studio.engine.session import LabelingSession

    plain = make_checkpoint(tmp_path / "plain.safetensors")
    hot = _with_temperature(plain, tmp_path / "hot.safetensors", 3.0)
    assert load_checkpoint(hot).temperature == 3.0 and load_checkpoint(plain).temperature == 1.0
    support = make_support(tmp_path / "support", per_class=2)
    qdir = tmp_path / "query"
    qdir.mkdir()
    for name in COLOURS:
        for i in range(3):
            colour_image(name, 50 + i, noise=60.0).save(qdir / f"{name}_{i}.png")
    queries = scan_images(qdir)
    settings = LabelSettings(unknown_threshold=0.0, batch_size=8)
    preds = {}
    for path in (plain, hot):
        with LabelingSession(path, settings, cache_path=tmp_path / "cache.sqlite",
                             backend="torch") as s:
            s.set_support(support)
            for _ in s.run(queries):
                pass
            preds[path.stem] = s.predictions()
            if path == hot:
                assert s.temperature == 3.0
                # the fast (one-matmul) path and the generic path agree with T applied
                g = torch.Generator().manual_seed(0)
                x = torch.randn(9, 64, generator=g) * 3
                predictor = s.model.fit(x, torch.arange(3).repeat(3), 3)
                fast = s.head.scorer(predictor)
                assert fast.linear
                q = torch.randn(20, 64, generator=g) * 3
                expected = torch.softmax(predictor(q) / 3.0, -1)
                torch.testing.assert_close(fast.probabilities(q), expected, atol=1e-5,
                                           rtol=1e-4)
                torch.testing.assert_close(s.head.probabilities(predictor(q)), expected)
    a, b = preds["plain"], preds["hot"]
    assert [p.path for p in a] == [p.path for p in b]
    assert [p.label for p in a] == [p.label for p in b]  # argmax unchanged
    assert [[c for c, _ in p.top] for p in a] == [[c for c, _ in p.top] for p in b]
    # confidences move: a temperature above 1 lowers every top probability below 1
    assert all(pb.confidence <= pa.confidence + 1e-6 for pa, pb in zip(a, b, strict=True))
    assert any(pb.confidence < pa.confidence - 1e-3 for pa, pb in zip(a, b, strict=True))


def _class_folders(root: Path, per_class: int = 6) -> Path:
    for name in COLOURS:
        d = root / name
        d.mkdir(parents=True)
        for i in range(per_class):
            colour_image(name, 200 + i, noise=70.0).save(d / f"{i}.png")
    return root


@pytest.mark.parametrize("fp16", [False, True])
def test_cli_calibrate_write_round_trip(tmp_path: Path, fp16: bool,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    path = make_checkpoint(tmp_path / "m.safetensors", image_size=16, hidden=8)
    if fp16:
        save_checkpoint(path, load_checkpoint(path), dtype=torch.float16)
    data = _class_folders(tmp_path / "data")
    before = load_checkpoint(path)
    args = ["calibrate", "--checkpoint", str(path), "--data", str(data), "--way", "3",
            "--shot", "1", "--query", "3", "--episodes", "6", "--seed", "1", "--device", "cpu"]
    assert main(args) == 0
    assert CALIBRATION_KEY not in read_metadata(path)["evaluation"]  # no --write: untouched
    capsys.readouterr()
    assert main([*args, "--write"]) == 0
    out = capsys.readouterr().out
    meta = read_metadata(path)
    rec = meta["evaluation"][CALIBRATION_KEY]
    assert rec["way"] == 3 and rec["shot"] == 1 and rec["episodes"] == 6
    assert rec["data"] == ["data"]
    assert math.isfinite(rec["temperature"]) and rec["temperature"] > 0
    assert f"temperature: {rec['temperature']:.4f}" in out
    assert temperature_from_metadata(meta["evaluation"]) == rec["temperature"]
    assert "test 5w1s" in meta["evaluation"]  # other results kept
    after = load_checkpoint(path)
    for k, v in before.state_dict.items():
        assert torch.equal(after.state_dict[k], v), k
    with safe_open(str(path), framework="pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118
    assert ("F16" in dtypes) == fp16
    # --check measures the recorded temperature on the same episodes: the same figures
    assert main([*args, "--check"]) == 0
    assert out.strip() == capsys.readouterr().out.strip()
