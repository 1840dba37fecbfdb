"""GPU decode (data/gpu_decode.py): JPEG routing, the torch resize against Pillow's, the Pillow
fallback, and (on a CUDA machine only) nvJPEG against Pillow.

On CPU the nvJPEG step is stood in for by ``_pillow_full``: Pillow decoding the whole JPEG at
full size, as nvJPEG does, so everything after the decode runs the GPU path's code."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_data import (
    exif_rotated_jpeg,
    image_bytes,
    odd_file_bytes,
    pattern_image,
    write_bad_files,
    write_odd_files,
)
from PIL import Image

from fewshot_studio.data.gpu_decode import (
    decode_batch,
    draft_scale,
    finish_batch,
    nvjpeg_decoder,
    plain_jpeg_info,
    preprocess_decoded,
    start_batch,
)
from fewshot_studio.data.images import (
    ImageLoadError,
    draft_size_for,
    image_to_uint8,
    load_and_preprocess,
    preprocess_image,
)
from fewshot_studio.data.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess

PHOTO = Preprocess(224, 3, IMAGENET_MEAN, IMAGENET_STD, "center_crop")
SMALL = Preprocess(24, 3, IMAGENET_MEAN, IMAGENET_STD, "center_crop")
GRAY = Preprocess(28, 1, (0.5,), (0.25,), "squash")
PRES = [PHOTO, Preprocess(84, 3, IMAGENET_MEAN, IMAGENET_STD, "squash"), GRAY,
        Preprocess(32, 3, (0.2, 0.3, 0.4), (0.5, 0.6, 0.7), "center_crop", 0.7)]


def _levels(a: np.ndarray, b: np.ndarray, pre: Preprocess) -> np.ndarray:
    """|a - b| of normalised images in uint8 levels (0..255 steps)."""
    std = np.broadcast_to(np.asarray(pre.std, np.float64), (pre.channels,))[:, None, None]
    return np.abs(a.astype(np.float64) - b) * 255.0 * std


def _pillow_full(datas: list[bytes], gray: bool) -> list[torch.Tensor]:
    """The CPU stand-in for nvJPEG: full-size decode, Y channel when ``gray``."""
    out = []
    for d in datas:
        img = Image.open(io.BytesIO(d))
        img.draft("L" if gray else "RGB", None)  # colour space only, no scaling
        out.append(torch.from_numpy(image_to_uint8(img.convert("L" if gray else "RGB"))))
    return out


def _photo(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (max(h // 6, 2), max(w // 6, 2), 3), dtype=np.uint8)
    return Image.fromarray(base).resize((w, h), Image.Resampling.BICUBIC)


def _jpeg(img: Image.Image, **kw: object) -> bytes:
    return image_bytes(img, "JPEG", quality=90, **kw)


# ---------------------------------------------------------------------------------- routing


def test_plain_jpegs_route_to_nvjpeg() -> None:
    rgb = _photo(40, 30, 0)
    for kw in ({}, {"progressive": True}, {"subsampling": 0}, {"subsampling": 1}):
        info = plain_jpeg_info(_jpeg(rgb, **kw))
        assert info is not None and (info.width, info.height, info.gray) == (40, 30, False), kw
    gray = plain_jpeg_info(_jpeg(pattern_image(1, 1, 20, "L")))
    assert gray is not None and gray.gray and (gray.width, gray.height) == (20, 20)
    upright = plain_jpeg_info(exif_rotated_jpeg(40, 20, orientation=1))
    assert upright is not None and (upright.width, upright.height) == (40, 20)


def test_everything_else_routes_to_pillow() -> None:
    odd = odd_file_bytes()
    jpg = _jpeg(_photo(40, 30, 1))
    exif_xmp = _jpeg(_photo(40, 30, 1), xmp=b'<x:xmpmeta><rdf:Description tiff:Orientation="6"/>'
                     b"</x:xmpmeta>")
    refused = {
        "cmyk": odd["cmyk.jpg"],
        "exif rotated": exif_rotated_jpeg(40, 20, orientation=6),
        "xmp rotated": exif_xmp,
        "adobe rgb": _jpeg(_photo(40, 30, 1), keep_rgb=True),
        "16-bit png": odd["sixteen.png"],
        "png": image_bytes(pattern_image(0, 0, 16), "PNG"),
        "truncated": jpg[: len(jpg) // 2],
        "no eoi": jpg[:-2],
        "text": b"not an image at all",
        "empty": b"",
        "soi only": b"\xff\xd8",
    }
    for name, data in refused.items():
        assert plain_jpeg_info(data) is None, name
    # the Pillow path reads the XMP orientation too: the routing must agree with it
    img = Image.open(io.BytesIO(exif_xmp))
    assert img.getexif().get(0x0112) == 6


def test_draft_scale_is_pillows_choice() -> None:
    for (w, h), pre in [((500, 375), PHOTO), ((1024, 768), PHOTO), ((4000, 3000), PHOTO),
                        ((105, 105), GRAY), ((1000, 90), GRAY), ((30, 20), GRAY)]:
        img = Image.open(io.BytesIO(_jpeg(Image.new("RGB", (w, h)))))
        d = draft_size_for(pre)
        img.draft("RGB", (d, d))
        s = draft_scale(w, h, d)
        assert img.size == (-(-w // s), -(-h // s)), (w, h)


def test_decode_batch_routes_and_keeps_pillow_rows_exact(tmp_path: Path) -> None:
    names = write_odd_files(tmp_path)
    (tmp_path / "gray.jpg").write_bytes(_jpeg(pattern_image(2, 0, 30, "L")))
    (tmp_path / "rgb.jpg").write_bytes(_jpeg(_photo(60, 45, 2)))
    paths = [tmp_path / n for n in [*names, "gray.jpg", "rgb.jpg"]]
    out = decode_batch(paths, SMALL, device="cpu", jpeg_decoder=_pillow_full)
    routed = {p.name for p, flag in zip(paths, out.nvjpeg, strict=True) if flag}
    assert routed == {"gray.jpg", "rgb.jpg"}  # not cmyk.jpg nor exif6.jpg
    assert out.images.shape == (len(paths), 3, 24, 24) and out.errors == [None] * len(paths)
    # Pillow's rows are its own; the routed ones (no draft reduction at this size, landscape
    # or square) come out of the torch resize equal to Pillow's too
    for p, row in zip(paths, out.images, strict=True):
        np.testing.assert_array_equal(row.numpy(), load_and_preprocess(p, SMALL))


def test_bad_files_give_todays_errors(tmp_path: Path) -> None:
    expected = write_bad_files(tmp_path)
    (tmp_path / "ok.jpg").write_bytes(_jpeg(_photo(40, 30, 3)))
    paths = [tmp_path / n for n in sorted(expected)] + [tmp_path / "ok.jpg", tmp_path / "gone.jpg"]
    for decoder in (_pillow_full, None):
        out = decode_batch(paths, SMALL, device="cpu", jpeg_decoder=decoder)
        for p, err, row in zip(paths, out.errors, out.images, strict=True):
            if p.name == "ok.jpg":
                assert err is None
                continue
            with pytest.raises(ImageLoadError) as ei:
                load_and_preprocess(p, SMALL)
            assert isinstance(err, ImageLoadError) and str(err) == str(ei.value), p.name
            assert not row.any()
        assert out.nvjpeg == [p.name == "ok.jpg" and decoder is not None for p in paths]


def test_without_cuda_or_torchvision_rows_are_todays(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    names = write_odd_files(tmp_path)
    (tmp_path / "big.jpg").write_bytes(_jpeg(_photo(500, 375, 4)))
    paths = [tmp_path / n for n in [*names, "big.jpg"]]
    assert nvjpeg_decoder("cpu") is None
    out = decode_batch(paths, PHOTO, device="cpu")
    ref = np.stack([load_and_preprocess(p, PHOTO) for p in paths])
    np.testing.assert_array_equal(out.images.numpy(), ref)
    assert not any(out.nvjpeg)
    # CUDA present but torchvision fails to import (a wheel built for another torch): Pillow
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setitem(sys.modules, "torchvision.io", None)
    nvjpeg_decoder.cache_clear()
    try:
        assert nvjpeg_decoder("cuda") is None
    finally:
        nvjpeg_decoder.cache_clear()


def test_decoder_failures_fall_back_per_file(tmp_path: Path) -> None:
    paths = []
    for i in range(4):
        paths.append(tmp_path / f"{i}.jpg")
        paths[-1].write_bytes(_jpeg(_photo(40 + i, 30, 10 + i)))
    bad = paths[1].read_bytes()
    calls: list[int] = []

    def flaky(datas: list[bytes], gray: bool) -> list[torch.Tensor]:
        calls.append(len(datas))
        if bad in datas:
            raise RuntimeError("nvjpeg: bad bitstream")
        out = _pillow_full(datas, gray)
        if datas[0] == paths[2].read_bytes():
            out[0] = out[0][:, :5]  # a wrong shape is not trusted either
        return out

    out = decode_batch(paths, SMALL, device="cpu", jpeg_decoder=flaky)
    assert calls == [4, 1, 1, 1, 1]  # the batch, then file by file
    assert out.nvjpeg == [True, False, False, True] and out.errors == [None] * 4
    for p, row in zip(paths, out.images, strict=True):
        np.testing.assert_array_equal(row.numpy(), load_and_preprocess(p, SMALL))


def test_thread_pool_dtype_and_layout(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    paths = []
    for i in range(5):
        paths.append(tmp_path / f"{i}.jpg")
        paths[-1].write_bytes(_jpeg(_photo(50, 40, 20 + i)))
    ref = decode_batch(paths, SMALL, device="cpu", jpeg_decoder=_pillow_full).images
    with ThreadPoolExecutor(2) as pool:
        out = decode_batch(paths, SMALL, device="cpu", pool=pool, jpeg_decoder=_pillow_full,
                           dtype=torch.bfloat16, channels_last=True)
    assert out.images.dtype == torch.bfloat16
    assert out.images.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out.images.float(), ref, atol=0.02, rtol=0.01)
    assert out.wait() is out.images  # no side stream on the CPU
    with ThreadPoolExecutor(2) as pool:  # the pipelined form: two batches in flight
        first = start_batch(paths[:3], SMALL, "cpu", pool, _pillow_full)
        second = start_batch(paths[3:], SMALL, "cpu", pool, _pillow_full)
        both = torch.cat([finish_batch(first).images, finish_batch(second).images])
    torch.testing.assert_close(both, ref, atol=0, rtol=0)


# ---------------------------------------------------------------- torch resize vs Pillow


@pytest.mark.parametrize("pre", PRES, ids=lambda p: f"{p.image_size}{p.resize}{p.channels}")
def test_torch_resize_matches_pillow_on_the_same_pixels(pre: Preprocess) -> None:
    """Same decoded pixels in: equal to Pillow's resize + normalisation, except that Pillow 13
    runs the vertical pass first for some (mostly tall) shapes; then values may differ by one
    uint8 level. Landscape shapes, and reductions by ``reducing_gap``, are exact."""
    exact = [(500, 375), (105, 105), (28, 28), (1000, 90), (224, 224), (1200, 900),
             (333, 257), (64, 48)]
    for i, (w, h) in enumerate([*exact, (37, 600), (375, 500), (90, 130)]):
        img = _photo(w, h, i)
        img = img.convert("L") if pre.channels == 1 else img
        ref = preprocess_image(img, pre)
        got = preprocess_decoded([torch.from_numpy(image_to_uint8(img))], pre, draft=False)
        assert got.shape == (1, pre.channels, pre.image_size, pre.image_size)
        diff = _levels(got[0].numpy(), ref, pre)
        assert diff.max() <= (1e-3 if (w, h) in exact else 1.0 + 1e-3), (w, h, diff.max())


def test_gray_source_is_replicated_to_rgb() -> None:
    img = pattern_image(3, 1, 40, "L")
    got = preprocess_decoded([torch.from_numpy(image_to_uint8(img))], SMALL, draft=False)
    np.testing.assert_array_equal(got[0].numpy(), preprocess_image(img, SMALL))


def test_draft_emulation_tolerance() -> None:
    """Full-size decode + block-average draft vs Pillow's libjpeg draft decode (scaled IDCT),
    on synthetic noisy photos: exact when no draft applies; otherwise within a few levels on
    average (measured: mean 0.6-3.4 levels, max 24, depending on the reduction)."""
    for i, (w, h) in enumerate([(500, 375), (640, 480), (1024, 768), (2000, 1500)]):
        data = _jpeg(_photo(w, h, 30 + i))
        ref = load_and_preprocess(data, PHOTO)
        got = preprocess_decoded(_pillow_full([data], False), PHOTO)[0].numpy()
        diff = _levels(got, ref, PHOTO)
        if draft_scale(w, h, draft_size_for(PHOTO)) == 1:
            assert diff.max() < 1e-3, (w, h)
        else:
            assert diff.mean() < 5.0 and np.percentile(diff, 99) < 20, (w, h, diff.mean())
    gray = _jpeg(_photo(400, 300, 40))
    ref = load_and_preprocess(gray, GRAY)
    got = preprocess_decoded(_pillow_full([gray], True), GRAY)[0].numpy()
    assert _levels(got, ref, GRAY).mean() < 1.0  # draft 1/8 to 50 x 38, then to 28


# ----------------------------------------------------------------------- CUDA (nvJPEG) only


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_nvjpeg_agrees_with_pillow(tmp_path: Path) -> None:
    if nvjpeg_decoder("cuda") is None:
        pytest.skip("torchvision with nvJPEG not importable")
    paths = []
    for i, (w, h) in enumerate([(500, 375), (375, 500), (640, 480), (1024, 768), (300, 300)]):
        paths.append(tmp_path / f"{i}.jpg")
        paths[-1].write_bytes(_jpeg(_photo(w, h, 50 + i)))
    (tmp_path / "g.jpg").write_bytes(_jpeg(pattern_image(4, 2, 120, "L").resize((400, 300))))
    paths.append(tmp_path / "g.jpg")
    for pre in (PHOTO, GRAY):
        out = decode_batch(paths, pre, device="cuda")
        assert all(out.nvjpeg) and out.images.device.type == "cuda"
        for p, row in zip(paths, out.images.cpu().numpy(), strict=True):
            diff = _levels(row, load_and_preprocess(p, pre), pre)
            assert diff.mean() < 4.0 and np.percentile(diff, 99) < 24, (p.name, diff.mean())
