"""ResNet-12 (Oreshkin et al. 2018, Lee et al. 2019): 4 residual blocks of widths
64-160-320-640, each 3 x conv3x3 with a 1x1 shortcut and a 2x2 max-pool."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from fewshot_studio.data.preprocess import Preprocess
from fewshot_studio.models.layers import norm2d
from fewshot_studio.models.registry import BACKBONES, BackboneCfg


class ResidualBlock(nn.Module):
    """3 x [conv3x3, BN] (LeakyReLU 0.1 between) + 1x1 conv/BN shortcut, LeakyReLU,
    maxpool 2."""

    def __init__(self, in_channels: int, out_channels: int,
                 track_running_stats: bool = True) -> None:
        super().__init__()

        def bn(c: int) -> nn.Module:
            return norm2d(c, track_running_stats)

        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.bn1 = bn(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = bn(out_channels)
        self.conv3 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn3 = bn(out_channels)
        self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False),
                                      bn(out_channels))
        self.act = nn.LeakyReLU(0.1)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.pool(self.act(out + self.shortcut(x)))


@BACKBONES.register("resnet12", cfg=BackboneCfg(Preprocess(
    image_size=84, channels=3, mean=(0.5,) * 3, std=(0.5,) * 3, resize="center_crop")))
class ResNet12(nn.Module):
    """ResNet-12, widths 64-160-320-640 by default (``widths`` configurable).

    ``(n, in_channels, H, W)`` -> ``(n, widths[-1], H/16, W/16)`` (floor at each pool): 5x5 at
    84 px. ``track_running_stats=False``: batch statistics always (full MAML). Default input:
    84 px RGB (miniImageNet).
    """

    def __init__(self, in_channels: int = 3, image_size: int = 84,
                 widths: Sequence[int] = (64, 160, 320, 640),
                 track_running_stats: bool = True) -> None:
        super().__init__()
        if len(widths) < 1:
            raise ValueError("widths must name at least one block")
        self.in_channels = in_channels
        self.image_size = image_size
        self.widths = tuple(int(w) for w in widths)
        self.track_running_stats = track_running_stats
        self.out_channels = self.widths[-1]
        chans = (in_channels, *self.widths)
        self.blocks = nn.Sequential(*[
            ResidualBlock(chans[i], chans[i + 1], track_running_stats)
            for i in range(len(self.widths))
        ])
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")
        self.feature_shape = self.feature_shape_for(image_size)
        if min(self.feature_shape[1:]) < 1:
            raise ValueError(f"image_size {image_size} is too small for ResNet-12")

    def feature_shape_for(self, image_size: int) -> tuple[int, int, int]:
        """``(C, h, w)`` of the features of a square ``image_size`` input."""
        s = image_size
        for _ in self.widths:
            s //= 2
        return (self.out_channels, s, s)

    def config(self) -> dict[str, Any]:
        """Constructor kwargs."""
        return {"in_channels": self.in_channels, "image_size": self.image_size,
                "widths": list(self.widths), "track_running_stats": self.track_running_stats}

    def forward(self, x: Tensor) -> Tensor:
        """``(n, C, H, W)`` -> ``(n, widths[-1], h, w)``."""
        return self.blocks(x)
