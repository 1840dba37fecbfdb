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
