"""Backbones: ``(n, C, H, W)`` images -> ``(n, out_channels, h, w)`` feature maps.

Each backbone exposes ``out_channels``, ``feature_shape`` (``(C, h, w)`` for its configured
``image_size``), ``feature_shape_for(image_size)`` and ``config()`` (its constructor kwargs).
Importing this package registers them in :data:`fewshot_studio.models.registry.BACKBONES`.
"""

from fewshot_studio.models.backbones.conv4 import Conv4
from fewshot_studio.models.backbones.efficientnet_lite0 import (
    EfficientNetLite0,
    convert_pretrained_lite0,
    pretrained_lite0_path,
)
from fewshot_studio.models.backbones.onnx_graph import OnnxGraph
from fewshot_studio.models.backbones.resnet12 import ResNet12
from fewshot_studio.models.backbones.timm_model import TimmBackbone

__all__ = [
    "Conv4",
    "EfficientNetLite0",
    "OnnxGraph",
    "ResNet12",
    "TimmBackbone",
    "convert_pretrained_lite0",
    "pretrained_lite0_path",
]
