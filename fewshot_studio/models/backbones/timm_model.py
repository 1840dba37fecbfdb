"""A timm model as a backbone (``fewshot-studio import-backbone --timm NAME``).

The model is built by name with ``timm.create_model(name, num_classes=0)`` (no classifier:
its output is the pooled feature vector, ``(n, d)``; a model whose output stays maps,
``(n, C, h, w)``, is average-pooled by the method). The weights travel in the checkpoint's
``.safetensors`` file like any backbone's: loading builds the architecture with
``pretrained=False`` and fills it, so a checkpoint never downloads anything; only importing
reads pretrained weights (timm's Hugging Face cache, or a local file).

Unlike an imported ONNX graph it has gradients, so test-time fine-tuning applies: the last
``blocks`` units of the model (:func:`trailing_units`) train. timm is an optional extra
(``pip install 'fewshot-studio[timm]'``); it imports torchvision, so it belongs with the
``gpu`` extra (PyPI's torchvision does not import beside the CPU build of torch).
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

from torch import Tensor, nn

from fewshot_studio.data.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from fewshot_studio.errors import UserError
from fewshot_studio.models.registry import BACKBONES, BackboneCfg


def import_timm() -> ModuleType:
    """The ``timm`` package; :class:`UserError` saying how to get it when it is missing."""
    try:
        import timm
    except ImportError as e:
        raise UserError(f"this needs timm, which is not installed or does not import "
                        f"({e}): pip install 'fewshot-studio[timm]' (timm needs torchvision, "
                        "as in the gpu extra)") from None
    return timm


def trailing_units(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """``module``'s units in order, named: its children with parameters, where a
    ``Sequential`` or ``ModuleList`` child stands for its items (recursively). For a
    ResNet the last are ``layer4.1``, ``layer4.0``, ...; for a ViT ``norm``, ``blocks.11``,
    ...; for an EfficientNet ``bn2``, ``conv_head``, ``blocks.6.0``, ... Parameters held
    by ``module`` itself (a ViT's ``cls_token``) are not in a unit."""
    units: list[tuple[str, nn.Module]] = []
    for name, child in module.named_children():
        if isinstance(child, (nn.Sequential, nn.ModuleList)):
            units += trailing_units(child, f"{prefix}{name}.")
        elif any(True for _ in child.parameters()):
            units.append((f"{prefix}{name}", child))
    return units


def create_timm_model(model_name: str, in_channels: int = 3, pretrained: bool = False,
                      weights_file: str | Path | None = None) -> nn.Module:
    """``timm.create_model(model_name, num_classes=0)``: without a classifier, with
    ``in_channels`` input channels; ``pretrained``: timm's pretrained weights, from
    ``weights_file`` when given (a local ``.safetensors``/``.pth`` file) else from timm's
    cache or hub. :class:`UserError` for an unknown name or weights that cannot be had."""
    timm = import_timm()
    overlay = {"file": str(weights_file)} if weights_file else None
    try:
        return timm.create_model(model_name, pretrained=pretrained, num_classes=0,
                                 in_chans=in_channels, pretrained_cfg_overlay=overlay)
    except RuntimeError as e:  # timm: "Unknown model (...)"
        raise UserError(f"timm cannot build {model_name!r}: {e}") from None
    except OSError as e:  # weights neither cached nor downloadable, or a bad file
        raise UserError(f"no pretrained weights for timm model {model_name!r} ({e}); "
                        "offline they must be in the Hugging Face cache, or give "
                        "--weights FILE") from None


@BACKBONES.register("timm", cfg=BackboneCfg(Preprocess(  # built by import-backbone only
    image_size=224, channels=3, mean=IMAGENET_MEAN, std=IMAGENET_STD, resize="center_crop"),
    trainable=False))
class TimmBackbone(nn.Module):
    """``(n, C, H, W)`` images -> ``(n, *feature_shape)``: the timm model ``model_name``
    without its classifier; ``feature_shape`` is its output per image. ``model`` (not part
    of :meth:`config`): an already built timm model to wrap (``import-backbone``, with its
    pretrained weights); else the architecture is built empty, for a checkpoint's weights."""

    def __init__(self, model_name: str = "", in_channels: int = 3, image_size: int = 224,
                 feature_shape: tuple[int, ...] | list[int] = (1,),
                 track_running_stats: bool = True, model: nn.Module | None = None) -> None:
        super().__init__()
        if not track_running_stats:
            raise ValueError("a timm model keeps its own normalisation: it cannot use batch "
                             "statistics (full MAML)")
        if not model_name:
            raise ValueError("a timm backbone needs a model name")
        self.model = model if model is not None else create_timm_model(model_name,
                                                                       in_channels)
        self.model_name = model_name
        self.in_channels = in_channels
        self.image_size = image_size
        self.feature_shape = tuple(int(n) for n in feature_shape)
        self.out_channels = self.feature_shape[0]

    def feature_shape_for(self, image_size: int) -> tuple[int, ...]:
        """The output per image (pooled by the model: not a function of ``image_size``)."""
        return self.feature_shape

    def config(self) -> dict[str, Any]:
        """Constructor kwargs (the weights are in the state dict)."""
        return {"model_name": self.model_name, "in_channels": self.in_channels,
                "image_size": self.image_size, "feature_shape": list(self.feature_shape)}

    def forward(self, x: Tensor) -> Tensor:
        """``(n, C, H, W)`` -> ``(n, *feature_shape)``."""
        return self.model(x)
