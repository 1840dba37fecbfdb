"""Batched augmentation: shapes, seeded determinism, identity at zero strength, real effects."""

from __future__ import annotations

import pytest
import torch

from fewshot_studio.data.augment import (
    color_jitter,
    dilate,
    erode,
    omniglot_augment,
    photo_augment,
    random_affine,
    random_resized_crop,
    random_thickness,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _chars(b: int = 6, size: int = 28) -> torch.Tensor:
    """White background, a dark off-centre cross per sample."""
    x = torch.ones(b, 1, size, size)
    for i in range(b):
        x[i, 0, 6 + i % 3 : 20, 12:15] = 0.0
        x[i, 0, 12:15, 5:22] = 0.0
    return x


def _photos(b: int = 4, size: int = 32) -> torch.Tensor:
    return torch.rand(b, 3, size, size, generator=_gen(123))


def test_omniglot_shapes_determinism_and_effect() -> None:
    x = _chars()
    a = omniglot_augment(x, _gen(1))
    b = omniglot_augment(x, _gen(1))
    c = omniglot_augment(x, _gen(2))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert (a - x).abs().mean() > 0.01  # it does something
    # each sample drawn differently: same input twice in a batch gives two different outputs
    twin = omniglot_augment(torch.cat([x[:1], x[:1]]), _gen(3))
    assert not torch.allclose(twin[0], twin[1])


def test_zero_strength_is_identity() -> None:
    x = _chars()
    torch.testing.assert_close(omniglot_augment(x, _gen(0), strength=0.0), x, atol=1e-5, rtol=0)
    p = _photos()
    torch.testing.assert_close(
        photo_augment(p, _gen(0), out_size=32, strength=0.0), p, atol=1e-5, rtol=0
    )


def test_affine_pure_translation_moves_content() -> None:
    # only translation enabled: the cross moves but keeps its ink (border padding is white)
    x = _chars(1)
    y = random_affine(x, _gen(5), degrees=0, scale=(1, 1), shear=0, translate=0.2)
    assert not torch.allclose(x, y)
    assert abs(float((1 - y).sum() - (1 - x).sum())) < 0.2 * float((1 - x).sum())


def test_dilate_erode_and_thickness() -> None:
    x = torch.zeros(1, 1, 9, 9)
    x[0, 0, 4, 4] = 1.0
    assert int(dilate(x).sum()) == 9  # a bright point grows into a 3x3 block
    assert int(erode(dilate(x)).sum()) == 1  # closing gives it back
    assert erode(dilate(x)).shape == x.shape
    ch = _chars(8)
    y = random_thickness(ch, _gen(0), amount=1.0)
    ink_before, ink_after = (1 - ch).sum((1, 2, 3)), (1 - y).sum((1, 2, 3))
    assert (ink_after > ink_before + 1).any() and (ink_after < ink_before - 1).any()


def test_photo_shapes_determinism_and_range() -> None:
    p = _photos(5, 48)
    a = photo_augment(p, _gen(9), out_size=24)
    assert a.shape == (5, 3, 24, 24)
    assert torch.equal(a, photo_augment(p, _gen(9), out_size=24))
    assert not torch.allclose(a, photo_augment(p, _gen(10), out_size=24))
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert photo_augment(p[:0], _gen(0), out_size=24).shape == (0, 3, 24, 24)


def test_flip_only_crop_mirrors() -> None:
    p = _photos(8)
    y = random_resized_crop(p, _gen(0), out_size=32, scale=(1, 1), ratio=(1, 1), flip_p=1.0)
    torch.testing.assert_close(y, p.flip(-1), atol=1e-5, rtol=0)


def test_crop_of_constant_quadrant_image() -> None:
    # left half 0, right half 1: a full-size crop keeps the mean; small crops vary per sample
    p = torch.zeros(16, 3, 32, 32)
    p[..., 16:] = 1.0
    y = random_resized_crop(p, _gen(1), out_size=16, scale=(0.1, 0.2), flip_p=0.0)
    means = y.mean((1, 2, 3))
    assert means.std() > 0.1


@pytest.mark.parametrize("channels", [1, 3])
def test_color_jitter(channels: int) -> None:
    p = torch.rand(6, channels, 8, 8, generator=_gen(4)) * 0.5 + 0.2  # x1.4 stays < 1
    y = color_jitter(p, _gen(4))
    assert y.shape == p.shape and not torch.allclose(y, p)
    torch.testing.assert_close(color_jitter(p, _gen(4), strength=0.0), p)
    # brightness alone scales every pixel of a sample by one factor
    yb = color_jitter(p, _gen(5), contrast=0.0, saturation=0.0)
    ratio = (yb / p).flatten(1)
    torch.testing.assert_close(ratio.min(1).values, ratio.max(1).values, atol=1e-4, rtol=0)


def test_generator_on_other_device_than_batch_is_fine() -> None:
    # the generator's device drives sampling; values move to the batch (CPU here, CUDA in use)
    x = _chars(2)
    assert omniglot_augment(x.double(), _gen(0)).dtype == torch.float64
