"""Registries of few-shot methods and backbones, and the factory that builds a model from a
checkpoint's model spec."""

from __future__ import annotations

from typing import Any

from torch import nn

from fewshot_studio.models.base import FewShotClassifier
from fewshot_studio.registry import Registry

METHODS: Registry[FewShotClassifier] = Registry("method")
BACKBONES: Registry[nn.Module] = Registry("backbone")


def create_backbone(name: str, **kwargs: Any) -> nn.Module:
    """Build a backbone by registry name. Backbones map ``(n, C, H, W)`` images to
    ``(n, *feature_shape)`` features and accept at least ``in_channels`` and ``image_size``."""
    return BACKBONES.create(name, **kwargs)


def create_method(name: str, backbone: nn.Module, **kwargs: Any) -> FewShotClassifier:
    """Build a method by registry name around an existing backbone."""
    return METHODS.create(name, backbone=backbone, **kwargs)


def build_model(spec: dict[str, Any]) -> FewShotClassifier:
    """Build from a model spec: ``{"method", "method_config", "backbone", "backbone_config"}``
    (as stored in checkpoint metadata, see :func:`model_spec`)."""
    backbone = create_backbone(spec["backbone"], **spec.get("backbone_config", {}))
    return create_method(spec["method"], backbone, **spec.get("method_config", {}))


def model_spec(model: FewShotClassifier, backbone: str,
               backbone_config: dict[str, Any]) -> dict[str, Any]:
    """The JSON-serialisable spec that :func:`build_model` rebuilds ``model`` from."""
    return {
        "method": model.method_name,
        "method_config": model.config(),
        "backbone": backbone,
        "backbone_config": dict(backbone_config),
    }
