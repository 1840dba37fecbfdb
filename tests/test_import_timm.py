"""Bring your own backbone from timm (``import-backbone --timm``): a stand-in ``timm`` module
(timm itself needs torchvision, which does not import beside the CPU build of torch) builds a
tiny network by name, with "pretrained" weights from its hub, a local file, or none. The
import keeps those weights and the model's input settings, the checkpoint rebuilds the same
features without timm's weights, fine-tuning trains only the last units, and a missing
timm, an unknown name or unreachable weights are refused in one line."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from engine_fixtures import COLOURS, make_support
from safetensors.torch import load_file, save_file
from torch import nn

from fewshot_studio.cli import main
from fewshot_studio.data.preprocess import IMAGENET_MEAN
from fewshot_studio.engine.export import read_csv
from fewshot_studio.errors import UserError
from fewshot_studio.io.backbone_import import InputOptions, import_timm_model, timm_preprocess
from fewshot_studio.io.checkpoint import load_checkpoint, save_checkpoint
from fewshot_studio.models.backbones.timm_model import TimmBackbone, trailing_units
from fewshot_studio.models.finetune import FinetuneSettings, augment_for, can_finetune, finetune

HUB_SEED, EMPTY_SEED = 7, 99


class TinyTimmNet(nn.Module):
    """Shaped like a timm model: ``stem``, ``blocks`` (a Sequential of stages), ``norm``,
    an Identity classifier (``num_classes=0``) and ``pretrained_cfg``; ``(n, C, 40, 40)``
    -> ``(n, 12)`` pooled features."""

    def __init__(self, in_chans: int, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Sequential(nn.Conv2d(in_chans, 8, 3, stride=2, padding=1),
                                  nn.BatchNorm2d(8), nn.ReLU())
        self.blocks = nn.Sequential(*[nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
                                      for _ in range(3)])
        self.proj = nn.Conv2d(8, 12, 1)
        self.norm = nn.BatchNorm2d(12)
        self.head = nn.Identity()
        for bn in (self.stem[1], self.norm):  # non-trivial running statistics
            bn.running_mean.uniform_(-0.1, 0.1)
            bn.running_var.uniform_(0.5, 1.5)
        self.pretrained_cfg: dict[str, Any] = {
            "input_size": (3, 40, 40), "mean": (0.4, 0.45, 0.5), "std": (0.2, 0.25, 0.3),
            "crop_pct": 0.9}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.proj(self.blocks(self.stem(x)))).mean((2, 3)))


@pytest.fixture
def fake_timm(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Install a stand-in ``timm``; returns the list of ``create_model`` calls."""
    calls: list[dict[str, Any]] = []

    def create_model(name: str, pretrained: bool = False, num_classes: int = 1000,
                     in_chans: int = 3, pretrained_cfg_overlay: dict | None = None
                     ) -> nn.Module:
        calls.append({"name": name, "pretrained": pretrained, "num_classes": num_classes,
                      "overlay": pretrained_cfg_overlay})
        if name not in ("tiny_net.test", "tiny_net.uncached"):
            raise RuntimeError(f"Unknown model ({name})")
        if num_classes != 0:
            raise AssertionError("the importer must drop the classifier")
        if not pretrained:
            return TinyTimmNet(in_chans, EMPTY_SEED)
        if pretrained_cfg_overlay and pretrained_cfg_overlay.get("file"):
            net = TinyTimmNet(in_chans, EMPTY_SEED)
            net.load_state_dict(load_file(pretrained_cfg_overlay["file"]))
            return net
        if name == "tiny_net.uncached":  # what huggingface_hub raises offline, uncached
            raise OSError("We couldn't connect to 'https://huggingface.co' to load the files, "
                          "and couldn't find them in the cached files.")
        return TinyTimmNet(in_chans, HUB_SEED)

    module = types.ModuleType("timm")
    module.create_model = create_model  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "timm", module)
    return calls


def batch(n: int = 3, size: int = 40) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(3))


def test_the_checkpoint_keeps_the_pretrained_weights_and_input(
        fake_timm: list[dict[str, Any]], tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "tiny.safetensors", import_timm_model("tiny_net.test"))
    pre = load_checkpoint(tmp_path / "tiny.safetensors").preprocess
    assert (pre.image_size, pre.channels, pre.mean, pre.std, pre.crop_fraction) == (
        40, 3, (0.4, 0.45, 0.5), (0.2, 0.25, 0.3), 0.9)
    assert fake_timm[0]["pretrained"] and fake_timm[0]["num_classes"] == 0
    model = load_checkpoint(tmp_path / "tiny.safetensors").build("cpu")
    assert fake_timm[-1]["pretrained"] is False  # loading builds empty, then fills it
    assert isinstance(model.backbone, TimmBackbone) and model.backbone.feature_shape == (12,)
    hub = TinyTimmNet(3, HUB_SEED).eval()
    with torch.no_grad():
        torch.testing.assert_close(model.embed(batch()), hub(batch()))
        empty = TinyTimmNet(3, EMPTY_SEED).eval()
        assert not torch.allclose(model.embed(batch()), empty(batch()))
    meta = load_checkpoint(tmp_path / "tiny.safetensors").training["imported"]
    assert meta["source"] == "timm" and meta["model"] == "tiny_net.test"


def test_options_override_the_models_input_settings(fake_timm: list[dict[str, Any]]) -> None:
    pre = import_timm_model("tiny_net.test", InputOptions(
        image_size=48, mean=(0.5,) * 3, std=(0.5,) * 3, resize="squash")).preprocess
    assert (pre.image_size, pre.mean, pre.std, pre.resize) == (48, (0.5,) * 3, (0.5,) * 3,
                                                               "squash")
    grey = import_timm_model("tiny_net.test", InputOptions(channels=1)).preprocess
    assert grey.channels == 1 and grey.mean == pytest.approx((0.45,))
    with pytest.raises(UserError, match="NCHW"):
        import_timm_model("tiny_net.test", InputOptions(layout="NHWC"))
    squashed = timm_preprocess({"input_size": (3, 64, 64), "crop_mode": "squash"},
                               InputOptions())
    assert (squashed.image_size, squashed.resize, squashed.mean) == (64, "squash",
                                                                     IMAGENET_MEAN)


def test_weights_from_a_local_file(fake_timm: list[dict[str, Any]], tmp_path: Path) -> None:
    mine = TinyTimmNet(3, 1234)
    weights = tmp_path / "mine.safetensors"
    save_file({k: v.contiguous() for k, v in mine.state_dict().items()}, str(weights))
    ckpt = save_checkpoint(tmp_path / "mine.ckpt.safetensors",
                           import_timm_model("tiny_net.uncached", weights=weights))
    assert fake_timm[0]["overlay"] == {"file": str(weights)}
    model = load_checkpoint(ckpt).build("cpu")
    with torch.no_grad():
        torch.testing.assert_close(model.embed(batch()), mine.eval()(batch()))


def test_what_cannot_be_imported_is_refused_in_one_line(
        fake_timm: list[dict[str, Any]], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UserError, match="timm cannot build 'no_such_net'"):
        import_timm_model("no_such_net")
    with pytest.raises(UserError, match=r"Hugging Face cache, or give --weights"):
        import_timm_model("tiny_net.uncached")
    with pytest.raises(UserError, match="no such weights file"):
        import_timm_model("tiny_net.test", weights=tmp_path / "missing.pth")
    ckpt = save_checkpoint(tmp_path / "t.safetensors", import_timm_model("tiny_net.test"))
    monkeypatch.setitem(sys.modules, "timm", None)  # timm not installed
    with pytest.raises(UserError, match=r"pip install 'fewshot-studio\[timm\]'"):
        load_checkpoint(ckpt).build("cpu")


def test_trailing_units_walk_sequentials_in_order() -> None:
    names = [n for n, _ in trailing_units(TinyTimmNet(3, 0))]
    assert names == ["stem.0", "stem.1", "blocks.0.0", "blocks.1.0", "blocks.2.0", "proj",
                     "norm"]  # ReLUs and the Identity head hold no parameters


def test_finetuning_trains_only_the_last_units(fake_timm: list[dict[str, Any]]) -> None:
    ckpt = import_timm_model("tiny_net.test")
    model = ckpt.build("cpu")
    assert can_finetune(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = batch(6)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    *_, last = finetune(model, images, labels, augment_for(ckpt.preprocess),
                        FinetuneSettings(steps=4, lr=1e-2, blocks=2, views=2))
    adapted = last.payload
    changed = {k for k, v in adapted.state_dict().items()
               if v.is_floating_point() and not torch.equal(v, before[k])}
    assert changed and {k.split(".")[2] for k in changed} == {"proj", "norm"}, changed
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_cli_imports_labels_and_finetunes(fake_timm: list[dict[str, Any]], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "tiny.safetensors"
    assert main(["import-backbone", "--timm", "tiny_net.test", "--out", str(out)]) == 0
    assert "the timm model tiny_net.test (12-d features)" in capsys.readouterr().out
    support = make_support(tmp_path / "support", per_class=3)
    query = tmp_path / "query"
    query.mkdir()
    truth = {}
    for name, paths in support.items():
        (query / f"{name}.png").write_bytes(paths[0].read_bytes())
        truth[f"{name}.png"] = name
    for adapt in ("none", "finetune"):
        labels = tmp_path / f"{adapt}.csv"
        assert main(["label", "--checkpoint", str(out), "--support", str(tmp_path / "support"),
                     "--query", str(query), "--out", str(labels), "--cache",
                     str(tmp_path / "cache.sqlite"), "--unknown-threshold", "0",
                     "--adapt", adapt]) == 0, capsys.readouterr().err
        rows = {r["path"]: r["label"] for r in read_csv(labels)}
        assert set(rows) == set(truth) and len(truth) == len(COLOURS)
        if adapt == "none":
            assert rows == truth
    # one source, not both or neither; --weights only with --timm
    assert main(["import-backbone", "--out", str(tmp_path / "x.safetensors")]) == 2
    assert main(["import-backbone", "x.onnx", "--timm", "tiny_net.test", "--out",
                 str(tmp_path / "x.safetensors")]) == 2
    assert main(["import-backbone", "x.onnx", "--weights", "w.pth", "--out",
                 str(tmp_path / "x.safetensors")]) == 2
    assert "either an ONNX model file or --timm" in capsys.readouterr().err
