"""Checkpoints: save/load round trip (fp32 and fp16), a rebuilt model computes the same
outputs, and files that are not ours or are damaged give a one-line CheckpointError (and a
one-line CLI error, no traceback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fewshot_studio.cli import main
from fewshot_studio.data.preprocess import Preprocess
from fewshot_studio.io.checkpoint import (
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    read_metadata,
    save_checkpoint,
)
from fewshot_studio.models import create_method, model_spec
from fewshot_studio.models.backbones import Conv4
from fewshot_studio.training.config import TrainConfig

REPO = Path(__file__).resolve().parent.parent
PRE = Preprocess(image_size=28, channels=1, mean=(0.1,), std=(0.3,))


def make_checkpoint() -> tuple[torch.nn.Module, Checkpoint]:
    torch.manual_seed(0)
    backbone = Conv4(1, 28, hidden=16)
    model = create_method("protonet", backbone, distance="cosine")
    # non-trivial BatchNorm buffers
    model.train()
    model.embed(torch.randn(8, 1, 28, 28))
    model.eval()
    ckpt = Checkpoint(model=model_spec(model, "conv4", backbone.config()), preprocess=PRE,
                      state_dict=model.state_dict(), name="tiny", description="a test",
                      training={"config": TrainConfig(data=("x.zip",)).to_dict()},
                      evaluation={"x 5w1s": {"accuracy": 0.5, "ci95": 0.01}})
    return model, ckpt


def test_round_trip_fp32(tmp_path: Path) -> None:
    model, ckpt = make_checkpoint()
    path = save_checkpoint(tmp_path / "m.safetensors", ckpt)
    back = load_checkpoint(path)
    assert back.model == ckpt.model and back.preprocess == PRE
    assert back.name == "tiny" and back.evaluation == ckpt.evaluation
    assert TrainConfig.from_dict(back.training["config"]).data == ("x.zip",)
    assert back.state_dict.keys() == ckpt.state_dict.keys()
    for k, v in ckpt.state_dict.items():
        assert torch.equal(back.state_dict[k], v), k
    rebuilt = back.build()
    x = torch.rand(6, 1, 28, 28)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    with torch.no_grad():
        assert torch.equal(rebuilt(x[:3], labels[:3], x[3:]), model(x[:3], labels[:3], x[3:]))


def test_fp16_halves_size_and_stays_close(tmp_path: Path) -> None:
    _, ckpt = make_checkpoint()
    full = save_checkpoint(tmp_path / "f32.safetensors", ckpt)
    half = save_checkpoint(tmp_path / "f16.safetensors", ckpt, dtype=torch.float16)
    assert half.stat().st_size < 0.6 * full.stat().st_size
    back = load_checkpoint(half)
    for k, v in ckpt.state_dict.items():
        w = back.state_dict[k]
        if v.is_floating_point():
            assert w.dtype == torch.float32
            torch.testing.assert_close(w, v, rtol=1e-3, atol=1e-3)
        else:
            assert torch.equal(w, v)  # integer buffers untouched


def bad_files(tmp_path: Path) -> dict[str, Path]:
    _, ckpt = make_checkpoint()
    good = save_checkpoint(tmp_path / "good.safetensors", ckpt)
    raw = good.read_bytes()
    files = {
        "text": tmp_path / "notes.safetensors",
        "empty": tmp_path / "empty.safetensors",
        "truncated": tmp_path / "truncated.safetensors",
        "foreign": tmp_path / "foreign.safetensors",
        "bad_json": tmp_path / "badjson.safetensors",
    }
    files["text"].write_text("just some text\n")
    files["empty"].write_bytes(b"")
    files["truncated"].write_bytes(raw[: len(raw) // 2])
    save_file({"w": torch.zeros(3)}, str(files["foreign"]))  # safetensors, not ours
    save_file({"w": torch.zeros(3)}, str(files["bad_json"]),
              metadata={"fewshot_studio": "{not json"})
    return files


def test_not_ours_or_damaged_gives_one_line_error(tmp_path: Path) -> None:
    for kind, path in bad_files(tmp_path).items():
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(path)
        msg = str(e.value)
        assert "\n" not in msg and path.name in msg, (kind, msg)
    with pytest.raises(CheckpointError, match="not found"):
        read_metadata(tmp_path / "missing.safetensors")


def test_cli_prints_one_line_no_traceback(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    files = bad_files(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    for path in files.values():
        assert main(["eval", "--checkpoint", str(path), "--data", str(data)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
    # the real entry point, as a user runs it
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "fewshot_studio", "eval", "--checkpoint",
         str(files["truncated"]), "--data", str(data)],
        capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "truncated.safetensors" in proc.stderr


def test_metadata_is_plain_json_in_the_header(tmp_path: Path) -> None:
    _, ckpt = make_checkpoint()
    path = save_checkpoint(tmp_path / "m.safetensors", ckpt)
    n = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8:8 + n])
    meta = json.loads(header["__metadata__"]["fewshot_studio"])
    assert meta["model"]["method"] == "protonet" and meta["preprocess"]["std"] == [0.3]


# -- untrusted metadata and weights (issue 12, defects 6, 7 and 12) ------------------------
def _tiny(tmp_path: Path) -> Path:
    from engine_fixtures import make_checkpoint as make_tiny

    return make_tiny(tmp_path / "tiny.safetensors")  # Conv4 hidden 16, RGB 32 px


def test_shapes_are_checked_on_the_meta_device_before_loading(tmp_path: Path) -> None:
    import time

    from bad_input_helpers import peak_rss_bytes, tamper_checkpoint

    src = _tiny(tmp_path)
    big = tamper_checkpoint(src, tmp_path / "big.safetensors", {"model": {"backbone_config": {
        "in_channels": 3, "image_size": 32, "hidden": 4096}}})
    before, t0 = peak_rss_bytes(), time.perf_counter()
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(big)
    assert time.perf_counter() - t0 < 1.0 and peak_rss_bytes() - before < 200 << 20
    assert str(e.value) == (f"{big}: the weights do not fit the model it describes (tensor "
                            "backbone.encoder.0.0.weight is (16, 3, 3, 3) in the file, the "
                            "model needs (4096, 3, 3, 3))")
    w = "backbone.encoder.0.0.weight"
    for name, tensors, expected in (
            ("missing", {w: None}, f"tensor {w} is missing"),
            ("extra", {"stowaway": torch.zeros(2)}, "unexpected tensor stowaway")):
        path = tamper_checkpoint(src, tmp_path / f"{name}.safetensors", tensors=tensors)
        with pytest.raises(CheckpointError, match=expected):
            load_checkpoint(path)
    odd = tamper_checkpoint(src, tmp_path / "odd.safetensors",
                            {"model": {"backbone": "no-such-net"}})
    with pytest.raises(CheckpointError, match="cannot build the model it describes"):
        load_checkpoint(odd)
    ckpt = load_checkpoint(src)  # build() checks too: a spec that does not fit its weights
    ckpt.model = {**ckpt.model, "backbone_config": {"in_channels": 3, "hidden": 4096}}
    with pytest.raises(CheckpointError, match=r"needs \(4096, 3, 3, 3\)"):
        ckpt.build()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(tmp_path: Path, value: float) -> None:
    from bad_input_helpers import tamper_checkpoint

    src = _tiny(tmp_path)
    w = load_checkpoint(src).state_dict["backbone.encoder.1.0.weight"].clone()
    w[0, 0, 0, 0] = value
    bad = tamper_checkpoint(src, tmp_path / "nan.safetensors",
                            tensors={"backbone.encoder.1.0.weight": w})
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(bad)
    assert str(e.value) == (f"{bad}: checkpoint weights contain NaN/Inf "
                            "(tensor backbone.encoder.1.0.weight)")


@pytest.mark.parametrize(("meta", "expected"), [
    ({"model": [1, 2]}, "'model' must be an object, not list"),
    ({"model": {"method": 3}}, "'model.method' must be a name, not int"),
    ({"model": {"backbone_config": "x"}}, "'model.backbone_config' must be an object"),
    ({"preprocess": [28, 1]}, "preprocess must be an object, not list"),
    ({"preprocess": {"channels": 7}}, "'channels' must be 1 or 3, not 7"),
    ({"preprocess": {"image_size": -5}}, "'image_size' must be an integer from 8 to 1024"),
    ({"preprocess": {"image_size": 12000}}, "'image_size' must be an integer from 8 to 1024"),
    ({"preprocess": {"image_size": 28.5}}, "not 28.5"),
    ({"preprocess": {"std": [0.0, 1, 1]}}, "'std' must be positive"),
    ({"preprocess": {"mean": [0.1, 0.2]}}, "'mean' must be a list of 1 or 3 numbers"),
    ({"preprocess": {"mean": ["a"]}}, "'mean' must be a list"),
    ({"preprocess": {"resize": "stretch"}}, "'resize' must be one of squash, center_crop"),
    ({"preprocess": {"crop_fraction": 0}}, "'crop_fraction' must be a number in (0, 1]"),
    ({"preprocess": {"colour": 1}}, "unknown key 'colour'"),
    ({"evaluation": [1]}, "'evaluation' must be an object, not list"),
    ({"name": {"a": 1}}, "'name' must be text, not dict"),
])
def test_bad_metadata_gives_one_line_error(tmp_path: Path, meta: dict,
                                           expected: str) -> None:
    from bad_input_helpers import tamper_checkpoint

    bad = tamper_checkpoint(_tiny(tmp_path), tmp_path / "bad.safetensors", meta)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(bad)
    msg = str(e.value)
    assert msg.startswith(f"{bad}: checkpoint metadata is damaged (") and expected in msg, msg
    assert "\n" not in msg


def test_metadata_that_is_not_an_object_or_too_deep(tmp_path: Path) -> None:
    for name, raw in (("list", "[1, 2]"), ("deep", "[" * 100_000 + "]" * 100_000)):
        path = tmp_path / f"{name}.safetensors"
        save_file({"w": torch.zeros(3)}, str(path), metadata={"fewshot_studio": raw})
        with pytest.raises(CheckpointError, match="checkpoint metadata is damaged"):
            load_checkpoint(path)


def test_preprocess_from_dict_round_trips_and_validates() -> None:
    from fewshot_studio.errors import UserError

    pre = Preprocess(224, 3, (0.5, 0.4, 0.3), (0.2, 0.2, 0.2), "center_crop", 0.9)
    assert Preprocess.from_dict(pre.to_dict()) == pre
    assert Preprocess.from_dict({}) == Preprocess()
    with pytest.raises(UserError, match=r"^preprocess: 'channels' must be 1 or 3, not True$"):
        Preprocess.from_dict({"channels": True})


@pytest.mark.filterwarnings("ignore:You are using the legacy:DeprecationWarning")
def test_an_onnx_graph_backbone_round_trips_in_fp16(tmp_path: Path) -> None:
    """An imported ONNX model travels as a uint8 tensor: a half-precision save leaves its
    bytes exact (only floating-point weights are halved) and the loaded model computes what
    the graph computes."""
    from fewshot_studio.models.backbones.onnx_graph import OnnxGraph

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten()).eval()
    src = tmp_path / "net.onnx"
    torch.onnx.export(net, (torch.randn(2, 1, 28, 28),), str(src), input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}},
                      dynamo=False)
    data = src.read_bytes()
    backbone = OnnxGraph(1, 28, len(data), "x", "y", "NCHW", (4,))
    backbone.set_graph(data)
    model = create_method("protonet", backbone)
    ckpt = Checkpoint(model=model_spec(model, "onnx", backbone.config()), preprocess=PRE,
                      state_dict=model.state_dict(), name="graph")
    back = load_checkpoint(save_checkpoint(tmp_path / "g.safetensors", ckpt,
                                           dtype=torch.float16))
    assert bytes(back.state_dict["backbone.graph"].numpy()) == data
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(back.build().embed(x), net(x).detach(), atol=1e-5, rtol=1e-4)
