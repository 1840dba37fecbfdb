"""How an image becomes a model input. Stored in every checkpoint's metadata so the engine,
the trainer and the ONNX export all preprocess identically."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Preprocess:
    """``image_size`` square side in px; ``channels`` 1 (grayscale) or 3 (RGB);
    ``mean``/``std`` per channel on [0, 1] pixel values; ``resize``: "squash" (resize to a
    square, ignoring aspect; right for Omniglot) or "center_crop" (shorter side to
    ``image_size / crop_fraction``, then a centre crop; right for photos)."""

    image_size: int = 28
    channels: int = 1
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    resize: str = "squash"
    crop_fraction: float = 0.875

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        d = dict(d)
        d["mean"] = tuple(d.get("mean", (0.0,)))
        d["std"] = tuple(d.get("std", (1.0,)))
        return cls(**d)


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
