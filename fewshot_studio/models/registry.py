"""Registries of few-shot methods and backbones, what each entry declares (a backbone's
preprocessing, a method's needs of its backbone) and the factories that build a model from
names or from a checkpoint's model spec."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from fewshot_studio.data.preprocess import Preprocess
from fewshot_studio.models.base import FewShotClassifier
from fewshot_studio.registry import Registry


def _no_needs(_method_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class MethodCfg:
    """What a method declares on its registry entry. ``backbone_needs``: the method's
    kwargs -> the backbone kwargs that configuration needs (full MAML:
    ``{"track_running_stats": False}``, batch statistics). Every backbone accepts
    ``in_channels``, ``image_size`` and ``track_running_stats``."""

    backbone_needs: Callable[[Mapping[str, Any]], dict[str, Any]] = _no_needs


@dataclass(frozen=True)
class BackboneCfg:
    """What a backbone declares on its registry entry (after timm's ``pretrained_cfg``):
    ``preprocess``, its default input (size, channels, normalisation, resize mode), which
    its ``image_size`` and ``in_channels`` defaults equal; ``trainable``: False for a
    backbone that ``train`` does not offer: one without gradients (an imported ONNX graph) or
    one that only ``import-backbone`` builds (a timm model, which needs a name and weights)."""

    preprocess: Preprocess = field(default_factory=Preprocess)
    trainable: bool = True


METHODS: Registry[FewShotClassifier, MethodCfg] = Registry("method", MethodCfg())
BACKBONES: Registry[nn.Module, BackboneCfg] = Registry("backbone", BackboneCfg())


def create_backbone(name: str, **kwargs: Any) -> nn.Module:
    """Build a backbone by registry name. Backbones map ``(n, C, H, W)`` images to
    ``(n, *feature_shape)`` features and accept at least ``in_channels``, ``image_size`` and
    ``track_running_stats``."""
    return BACKBONES.create(name, **kwargs)


def create_method(name: str, backbone: nn.Module, **kwargs: Any) -> FewShotClassifier:
    """Build a method by registry name around an existing backbone (built as the method
    needs: see :func:`create_model`)."""
    return METHODS.create(name, backbone=backbone, **kwargs)


def create_model(method: str, backbone: str, method_kwargs: Mapping[str, Any] | None = None,
                 backbone_kwargs: Mapping[str, Any] | None = None) -> FewShotClassifier:
    """Build ``method`` on a new ``backbone``, the backbone built with what the method
    declares it needs (:attr:`MethodCfg.backbone_needs`) unless ``backbone_kwargs`` say
    otherwise (then the method refuses a backbone it cannot use). Raises ``KeyError`` for an
    unknown name, ``TypeError``/``ValueError`` for bad kwargs."""
    mkw = dict(method_kwargs or {})
    bkw = {**METHODS.get(method).cfg.backbone_needs(mkw), **(backbone_kwargs or {})}
    return create_method(method, create_backbone(backbone, **bkw), **mkw)


def build_model(spec: dict[str, Any]) -> FewShotClassifier:
    """Build from a model spec: ``{"method", "method_config", "backbone", "backbone_config"}``
    (as stored in checkpoint metadata, see :func:`model_spec`)."""
    return create_model(spec["method"], spec["backbone"], spec.get("method_config", {}),
                        spec.get("backbone_config", {}))


def model_spec(model: FewShotClassifier, backbone: str,
               backbone_config: dict[str, Any]) -> dict[str, Any]:
    """The JSON-serialisable spec that :func:`build_model` rebuilds ``model`` from."""
    return {
        "method": model.method_name,
        "method_config": model.config(),
        "backbone": backbone,
        "backbone_config": dict(backbone_config),
    }
