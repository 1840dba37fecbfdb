"""How an image becomes a model input. Stored in every checkpoint's metadata so the engine,
the trainer and the ONNX export all preprocess identically."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from fewshot_studio.errors import UserError

RESIZE_MODES: tuple[str, ...] = ("squash", "center_crop")
"""The known ``Preprocess.resize`` values."""

IMAGE_SIZE_RANGE: tuple[int, int] = (8, 1024)
"""Sane ``image_size`` bounds: a value read from a file outside them is refused before any
tensor of that size is allocated (``image_size=12000`` would ask for tens of GB)."""


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
    def from_dict(cls, d: Any) -> Preprocess:
        """Inverse of :meth:`to_dict` for untrusted input (checkpoint metadata, configs): every
        value is type- and range-checked; :class:`UserError` with a one-line reason (e.g.
        "preprocess: 'channels' must be 1 or 3, not 7") otherwise."""
        if not isinstance(d, dict):
            raise UserError(f"preprocess must be an object, not {type(d).__name__}")
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise UserError(f"preprocess: unknown key {str(unknown[0])[:40]!r}")
        base = cls()
        channels = d.get("channels", base.channels)
        if not _is_int(channels) or channels not in (1, 3):
            raise UserError(f"preprocess: 'channels' must be 1 or 3, not {_show(channels)}")
        size = d.get("image_size", base.image_size)
        lo, hi = IMAGE_SIZE_RANGE
        if not _is_int(size) or not lo <= size <= hi:
            raise UserError(f"preprocess: 'image_size' must be an integer from {lo} to {hi}, "
                            f"not {_show(size)}")
        stats = {}
        for key in ("mean", "std"):
            v = d.get(key, getattr(base, key))
            if not isinstance(v, (list, tuple)) or len(v) not in (1, channels) or not all(
                    _is_number(x) for x in v):
                raise UserError(f"preprocess: '{key}' must be a list of 1 or {channels} "
                                f"numbers, not {_show(v)}")
            stats[key] = tuple(float(x) for x in v)
        if not all(s > 0 for s in stats["std"]):
            raise UserError(f"preprocess: 'std' must be positive, not {_show(d.get('std'))}")
        resize = d.get("resize", base.resize)
        if resize not in RESIZE_MODES:
            raise UserError(f"preprocess: 'resize' must be one of {', '.join(RESIZE_MODES)}, "
                            f"not {_show(resize)}")
        crop = d.get("crop_fraction", base.crop_fraction)
        if not _is_number(crop) or not 0 < crop <= 1:
            raise UserError(f"preprocess: 'crop_fraction' must be a number in (0, 1], "
                            f"not {_show(crop)}")
        return cls(image_size=int(size), channels=int(channels), mean=stats["mean"],
                   std=stats["std"], resize=str(resize), crop_fraction=float(crop))


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v))


def _show(v: object) -> str:
    """A short one-line repr of an untrusted value for a message."""
    text = " ".join(repr(v).split())
    return text if len(text) <= 40 else text[:37] + "..."


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
