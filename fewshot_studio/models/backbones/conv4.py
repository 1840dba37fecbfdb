"""Conv4: the 4-block convolutional backbone of Vinyals et al. 2016, Snell et al. 2017,
Finn et al. 2017 and Sung et al. 2018."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from fewshot_studio.data.preprocess import Preprocess
from fewshot_studio.models.layers import norm2d
from fewshot_studio.models.registry import BACKBONES, BackboneCfg


def conv_block(in_channels: int, out_channels: int, pool: bool,
               track_running_stats: bool = True) -> nn.Sequential:
    """conv3x3 (padding 1) -> BatchNorm -> ReLU [-> maxpool 2]."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, 3, padding=1),
        norm2d(out_channels, track_running_stats),
        nn.ReLU(inplace=False),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


@BACKBONES.register("conv4", cfg=BackboneCfg(Preprocess(
    image_size=28, channels=1, mean=(0.0,), std=(1.0,), resize="squash")))
class Conv4(nn.Module):
    """4 x [conv3x3-hidden, BN, ReLU, maxpool 2]; any channels and input size.

    ``pool_layers``: how many of the first blocks pool (4 as in ProtoNet/MAML; 2 for the
    Relation Network, giving 64x7x7 maps at 28 px). ``track_running_stats=False`` makes every
    BatchNorm a :class:`~fewshot_studio.models.layers.BatchStatNorm2d`: the statistics of the
    current batch, in training and evaluation alike (full MAML, as in Finn et al. 2017; also
    what lets torch.func.vmap run it per task). Default input: 28 px grayscale (Omniglot).

    ``(n, in_channels, H, W)`` -> ``(n, hidden, h, w)`` feature maps; ``feature_shape`` is
    ``(hidden, h, w)`` for ``image_size``.
    """

    def __init__(self, in_channels: int = 1, image_size: int = 28, hidden: int = 64,
                 pool_layers: int = 4, track_running_stats: bool = True) -> None:
        super().__init__()
        if not 0 <= pool_layers <= 4:
            raise ValueError(f"pool_layers must be in 0..4, got {pool_layers}")
        self.in_channels = in_channels
        self.image_size = image_size
        self.hidden = hidden
        self.pool_layers = pool_layers
        self.track_running_stats = track_running_stats
        self.out_channels = hidden
        self.encoder = nn.Sequential(*[
            conv_block(in_channels if i == 0 else hidden, hidden, pool=i < pool_layers,
                       track_running_stats=track_running_stats)
            for i in range(4)
        ])
        self.feature_shape = self.feature_shape_for(image_size)
        if min(self.feature_shape[1:]) < 1:
            raise ValueError(f"image_size {image_size} is too small for {pool_layers} poolings")

    def feature_shape_for(self, image_size: int) -> tuple[int, int, int]:
        """``(C, h, w)`` of the features of a square ``image_size`` input."""
        s = image_size
        for _ in range(self.pool_layers):
            s //= 2
        return (self.out_channels, s, s)

    def config(self) -> dict[str, Any]:
        """Constructor kwargs."""
        return {"in_channels": self.in_channels, "image_size": self.image_size,
                "hidden": self.hidden, "pool_layers": self.pool_layers,
                "track_running_stats": self.track_running_stats}

    def forward(self, x: Tensor) -> Tensor:
        """``(n, C, H, W)`` -> ``(n, hidden, h, w)``."""
        return self.encoder(x)
