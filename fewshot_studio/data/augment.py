"""Batched, generator-seeded augmentation in torch (CPU or CUDA; no torchvision).

Every random number comes from the ``generator`` passed in (on its own device; values are
moved to the batch's device), so a seed fixes the result. ``strength`` scales every range:
``strength=0`` is the identity (up to float rounding), 1 the defaults.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _rand(n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """U[0, 1) of shape (n,) drawn on the generator's device, returned on ``device``."""
    return torch.rand(n, generator=generator, device=generator.device).to(device)


def _uniform(
    n: int, lo: float, hi: float, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    return lo + (hi - lo) * _rand(n, generator, device)


def _affine(
    x: torch.Tensor, theta: torch.Tensor, size: tuple[int, int], padding: str
) -> torch.Tensor:
    """Sample ``x`` (B, C, H, W) through per-sample affine maps ``theta`` (B, 2, 3) (output
    coords -> input coords, normalised [-1, 1]) into (B, C, *size)."""
    b, c = x.shape[:2]
    grid = F.affine_grid(theta.to(x.dtype), [b, c, *size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding, align_corners=False)


def random_affine(
    x: torch.Tensor,
    generator: torch.Generator,
    degrees: float = 10.0,
    scale: tuple[float, float] = (0.9, 1.1),
    shear: float = 10.0,
    translate: float = 0.1,
    strength: float = 1.0,
    padding: str = "border",
) -> torch.Tensor:
    """Random rotation (+-``degrees``), isotropic scale, x-shear (+-``shear`` degrees) and
    translation (+-``translate`` of the side) per sample. (B, C, H, W) -> same shape.
    ``padding="border"`` repeats the edge (the background of a character image)."""
    return affine(x, random_affine_theta(x.shape[0], generator, x.device, degrees, scale,
                                         shear, translate, strength), padding)


def random_affine_theta(
    b: int,
    generator: torch.Generator,
    dev: torch.device,
    degrees: float = 10.0,
    scale: tuple[float, float] = (0.9, 1.1),
    shear: float = 10.0,
    translate: float = 0.1,
    strength: float = 1.0,
) -> torch.Tensor:
    """The ``(b, 2, 3)`` sampling maps (output -> input, normalised coordinates) of
    :func:`random_affine`, on ``dev``."""
    s = float(strength)
    rot = torch.deg2rad(_uniform(b, -degrees * s, degrees * s, generator, dev))
    lo = 1.0 + (scale[0] - 1.0) * s
    hi = 1.0 + (scale[1] - 1.0) * s
    # log-uniform scale, so shrinking and growing are equally likely
    sc = torch.exp(_uniform(b, math.log(lo), math.log(hi), generator, dev))
    sh = torch.tan(torch.deg2rad(_uniform(b, -shear * s, shear * s, generator, dev)))
    tx = _uniform(b, -2 * translate * s, 2 * translate * s, generator, dev)  # [-1,1] coords
    ty = _uniform(b, -2 * translate * s, 2 * translate * s, generator, dev)
    cos, sin = torch.cos(rot), torch.sin(rot)
    # forward map A = R @ Sh * sc; grid_sample needs the inverse (output -> input)
    a = torch.stack(
        [torch.stack([cos, cos * sh - sin], -1), torch.stack([sin, sin * sh + cos], -1)], -2
    ) * sc.view(b, 1, 1)
    inv = torch.linalg.inv(a)
    t = -(inv @ torch.stack([tx, ty], -1).unsqueeze(-1))
    return torch.cat([inv, t], dim=-1)


def affine(x: torch.Tensor, theta: torch.Tensor, padding: str = "border") -> torch.Tensor:
    """``x`` (B, C, H, W) through the sampling maps ``theta`` ((B, 2, 3), or (1, 2, 3) for
    all) -> same shape."""
    return _affine(x, theta.expand(x.shape[0], 2, 3), (x.shape[-2], x.shape[-1]), padding)


def dilate(x: torch.Tensor, k: int = 3) -> torch.Tensor:
    """Grey-level dilation (local max over a k x k window), same shape."""
    return F.max_pool2d(x, k, stride=1, padding=k // 2)


def erode(x: torch.Tensor, k: int = 3) -> torch.Tensor:
    """Grey-level erosion (local min over a k x k window), same shape."""
    return -F.max_pool2d(-x, k, stride=1, padding=k // 2)


THICKNESS_AMOUNT = 0.6  # random_thickness's largest blend toward dilation/erosion


def random_thickness(
    x: torch.Tensor, generator: torch.Generator, amount: float = THICKNESS_AMOUNT,
    strength: float = 1.0
) -> torch.Tensor:
    """Per sample, blend toward its 3x3 dilation or erosion by a random fraction in
    [0, ``amount * strength``]: strokes get thicker or thinner whatever their polarity."""
    b, dev = x.shape[0], x.device
    frac = _uniform(b, 0.0, amount * float(strength), generator, dev)
    use_dilate = _rand(b, generator, dev) < 0.5
    return thicken(x, frac, use_dilate)


def thicken(x: torch.Tensor, frac: torch.Tensor, use_dilate: torch.Tensor) -> torch.Tensor:
    """Blend each sample of ``x`` (B, C, H, W) by ``frac`` ((B,) or (1,)) toward its 3x3
    dilation where ``use_dilate`` (bool, same shape), else its erosion."""
    b = frac.shape[0]
    target = torch.where(use_dilate.view(b, 1, 1, 1), dilate(x), erode(x))
    return x + frac.view(b, 1, 1, 1).to(x.dtype) * (target - x)


def omniglot_augment(
    x: torch.Tensor, generator: torch.Generator, strength: float = 1.0
) -> torch.Tensor:
    """Character augmentation: a small random affine warp (rotation +-10 deg, scale 0.9-1.1,
    shear +-10 deg, translate +-10%) then random stroke thickness. x: float (B, C, H, W)
    (normalised or not) -> same shape. The 90-degree rotations are classes, not augmentation:
    see :func:`~fewshot_studio.data.datasets.preload`."""
    if x.shape[0] == 0:
        return x
    y = random_affine(x, generator, strength=strength)
    return random_thickness(y, generator, strength=strength)


def random_resized_crop(
    x: torch.Tensor,
    generator: torch.Generator,
    out_size: int,
    scale: tuple[float, float] = (0.25, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip_p: float = 0.5,
    strength: float = 1.0,
) -> torch.Tensor:
    """Per sample, crop a random box of ``scale`` x the area and aspect ``ratio`` (kept inside
    the image) and resize it to ``out_size`` (bilinear), flipping horizontally with
    probability ``flip_p``. (B, C, H, W) -> (B, C, out_size, out_size)."""
    b, dev = x.shape[0], x.device
    s = float(strength)
    area = _uniform(b, 1.0 - (1.0 - scale[0]) * s, 1.0 - (1.0 - scale[1]) * s, generator, dev)
    lr = _uniform(b, math.log(ratio[0]) * s, math.log(ratio[1]) * s, generator, dev)
    r = torch.exp(lr)
    w = torch.sqrt(area * r).clamp(max=1.0)  # fractions of the width / height
    h = torch.sqrt(area / r).clamp(max=1.0)
    cx = (1.0 - w) * (2 * _rand(b, generator, dev) - 1)  # centre in [-1, 1] coords, box inside
    cy = (1.0 - h) * (2 * _rand(b, generator, dev) - 1)
    flip = _rand(b, generator, dev) < flip_p * min(1.0, s)
    sx = torch.where(flip, -w, w)
    zeros = torch.zeros_like(w)
    theta = torch.stack([torch.stack([sx, zeros, cx], -1), torch.stack([zeros, h, cy], -1)], -2)
    # antialias: shrink first when the crop is much larger than the output
    src = min(x.shape[-2], x.shape[-1])
    if src > 2 * out_size:
        f = max(1, src // (2 * out_size))
        x = F.avg_pool2d(x, f) if f > 1 else x
    return _affine(x, theta, (out_size, out_size), "reflection")


def color_jitter(
    x: torch.Tensor,
    generator: torch.Generator,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.4,
    strength: float = 1.0,
) -> torch.Tensor:
    """Random brightness, contrast and saturation factors in [1 - a*strength, 1 + a*strength]
    per sample. x: float (B, C, H, W) in [0, 1]; the result is clamped to [0, 1]."""
    b, dev = x.shape[0], x.device
    s = float(strength)

    def factor(a: float) -> torch.Tensor:
        return _uniform(b, 1.0 - a * s, 1.0 + a * s, generator, dev).view(b, 1, 1, 1).to(x.dtype)

    fb, fc, fs = factor(brightness), factor(contrast), factor(saturation)
    y = x * fb
    if x.shape[1] == 3:
        wts = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=dev).view(1, 3, 1, 1)
        gray = (y * wts).sum(1, keepdim=True)
    else:
        gray = y
    mean = gray.mean(dim=(1, 2, 3), keepdim=True)
    y = (y - mean) * fc + mean
    if x.shape[1] == 3:
        gray = (y * wts).sum(1, keepdim=True)
        y = (y - gray) * fs + gray
    return y.clamp(0.0, 1.0)


def photo_augment(
    x: torch.Tensor,
    generator: torch.Generator,
    out_size: int,
    strength: float = 1.0,
    scale: tuple[float, float] = (0.25, 1.0),
) -> torch.Tensor:
    """Photo augmentation: random resized crop (area ``scale``, aspect 3/4-4/3) to
    ``out_size``, horizontal flip, colour jitter (brightness, contrast, saturation +-0.4).
    x: float (B, C, H, W) in [0, 1] (normalise afterwards) -> (B, C, out_size, out_size)."""
    if x.shape[0] == 0:
        return x.new_zeros((0, x.shape[1], out_size, out_size))
    y = random_resized_crop(x, generator, out_size, scale=scale, strength=strength)
    return color_jitter(y, generator, strength=strength)
