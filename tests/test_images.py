"""Robust image loading: every kind of bad or odd file from issue 2/3 on generated fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from fixtures_data import (
    bad_file_bytes,
    exif_rotated_jpeg,
    image_bytes,
    odd_file_bytes,
    pattern_image,
    png_claiming_size,
    write_bad_files,
    write_odd_files,
)
from PIL import Image

from fewshot_studio.data.images import (
    IMAGE_EXTENSIONS,
    MAX_PIXELS,
    ImageLoadError,
    draft_size_for,
    is_image_path,
    load_and_preprocess,
    load_image,
    load_uint8,
    normalize_constants,
    normalize_uint8,
    preprocess_image,
    read_image_file,
    resize_box,
    resize_image,
)
from fewshot_studio.data.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess


def test_extensions_and_constants() -> None:
    assert {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"} == IMAGE_EXTENSIONS
    assert MAX_PIXELS == 89_478_485
    assert is_image_path("a/B.JPG") and not is_image_path("a/.hidden.png")
    assert not is_image_path("notes.txt")


@pytest.mark.parametrize("name", sorted(bad_file_bytes()))
def test_bad_files_raise_one_line_reason(tmp_path: Path, name: str) -> None:
    expected = write_bad_files(tmp_path)[name]
    for source in (tmp_path / name, (tmp_path / name).read_bytes()):
        with pytest.raises(ImageLoadError) as ei:
            load_image(source, channels=3)
        msg = str(ei.value)
        assert expected in msg, msg
        assert "\n" not in msg and len(msg) < 210


def test_bomb_message_names_pixel_count() -> None:
    with pytest.raises(ImageLoadError, match=r"decompression bomb \(10000000000 pixels\)"):
        load_image(png_claiming_size(100_000, 100_000), 1)


def test_bomb_guard_parameter_on_a_real_image() -> None:
    data = image_bytes(pattern_image(0, 0, 64), "PNG")
    assert load_image(data, 3, max_pixels=64 * 64).size == (64, 64)
    with pytest.raises(ImageLoadError, match=r"decompression bomb \(4096 pixels\)"):
        load_image(data, 3, max_pixels=64 * 64 - 1)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ImageLoadError, match="file not found"):
        load_image(tmp_path / "nope.png", 3)
    with pytest.raises(ImageLoadError, match="is a directory"):
        load_image(tmp_path, 3)


def test_unreadable_file(tmp_path: Path) -> None:
    p = tmp_path / "locked.png"
    p.write_bytes(image_bytes(pattern_image(0, 0, 16), "PNG"))
    p.chmod(0)
    try:
        if os.access(p, os.R_OK):
            pytest.skip("running as root: file permissions are not enforced")
        with pytest.raises(ImageLoadError, match="permission denied"):
            load_image(p, 3)
    finally:
        p.chmod(0o644)


def test_odd_formats_load_in_both_modes(tmp_path: Path) -> None:
    names = write_odd_files(tmp_path)
    for name in names:
        for channels, mode in ((1, "L"), (3, "RGB")):
            img = load_image(tmp_path / name, channels)
            assert img.mode == mode, name
            assert np.asarray(img).dtype == np.uint8


def test_cmyk_becomes_red() -> None:
    px = np.asarray(load_image(odd_file_bytes()["cmyk.jpg"], 3)).astype(int)
    r, g, b = px[..., 0].mean(), px[..., 1].mean(), px[..., 2].mean()
    assert r > 200 and g < 60 and b < 60


def test_sixteen_bit_scaled_not_clipped() -> None:
    # 65535 -> 255; and a mid value maps to the middle (PIL's convert would clip to 255)
    assert int(np.asarray(load_image(odd_file_bytes()["sixteen.png"], 1)).min()) == 255
    mid = Image.fromarray(np.full((4, 4), 32896, np.uint16))
    a = np.asarray(load_image(image_bytes(mid, "PNG"), 1))
    assert np.all(a == 128)


def test_transparency_composited_on_white() -> None:
    odd = odd_file_bytes()
    # fully transparent palette index 0 and fully transparent LA: all white
    assert np.all(np.asarray(load_image(odd["palette_alpha.png"], 3)) == 255)
    assert np.all(np.asarray(load_image(odd["la.png"], 1)) == 255)
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 255))
    assert np.all(np.asarray(load_image(image_bytes(rgba), 3)) == 0)


def test_exif_orientation_applied() -> None:
    img = load_image(exif_rotated_jpeg(40, 20, orientation=6), 3)
    assert img.size == (20, 40)  # dims swapped
    a = np.asarray(img).astype(int)
    # orientation 6 = rotate 90 clockwise for display: the left blue band is now on top
    assert a[:5, :, 2].mean() > 150 and a[-5:, :, 0].mean() > 150
    assert load_image(exif_rotated_jpeg(40, 20, orientation=1), 3).size == (40, 20)


def test_unicode_filename(tmp_path: Path) -> None:
    write_odd_files(tmp_path)
    assert load_image(tmp_path / "画像_é.png", 1).size == (20, 20)


def test_jpeg_draft_decodes_smaller_but_not_below_target() -> None:
    data = image_bytes(pattern_image(0, 0, 500).resize((500, 375)), "JPEG", quality=90)
    full = load_image(data, 3)
    assert full.size == (500, 375)
    small = load_image(data, 3, draft_size=84)
    assert small.size[0] < 500 and min(small.size) >= 84  # 1/4 scale: 125 x 94
    gray = load_image(data, 1, draft_size=84)
    assert gray.mode == "L" and min(gray.size) >= 84


def test_preprocess_squash_and_normalisation() -> None:
    pre = Preprocess(image_size=28, channels=1, mean=(0.5,), std=(0.25,), resize="squash")
    img = Image.new("L", (105, 60), 255)
    x = preprocess_image(img, pre)
    assert x.shape == (1, 28, 28) and x.dtype == np.float32
    np.testing.assert_allclose(x, (1.0 - 0.5) / 0.25, atol=1e-5)


def test_preprocess_center_crop_keeps_centre() -> None:
    pre = Preprocess(
        image_size=32, channels=3, mean=IMAGENET_MEAN, std=IMAGENET_STD, resize="center_crop"
    )
    img = Image.new("RGB", (200, 100), (0, 0, 0))
    img.paste((255, 255, 255), (50, 0, 150, 100))  # white band, wider than the crop
    out = resize_image(img, pre)
    assert out.size == (32, 32)
    assert np.asarray(out).min() >= 250  # crop is 87.5 x 87.5 px in the centre: all white
    x = preprocess_image(img, pre)
    assert x.shape == (3, 32, 32)
    np.testing.assert_allclose(
        x[:, 16, 16], (np.array([1.0, 1.0, 1.0]) - IMAGENET_MEAN) / IMAGENET_STD, atol=1e-2
    )
    assert draft_size_for(pre) == 37


def test_preprocess_converts_mode_and_normalize_matches() -> None:
    pre = Preprocess(image_size=16, channels=3, mean=(0.2, 0.3, 0.4), std=(0.5, 0.6, 0.7))
    img = pattern_image(4, 2, 16, "L")
    x = preprocess_image(img, pre)  # L in, 3 channels out
    assert x.shape == (3, 16, 16)
    u8 = np.repeat(np.asarray(img)[None], 3, axis=0)
    ref = (u8 / 255.0 - np.array(pre.mean)[:, None, None]) / np.array(pre.std)[:, None, None]
    np.testing.assert_allclose(x, ref, atol=1e-5)
    np.testing.assert_allclose(normalize_uint8(u8, pre), ref, atol=1e-5)


def test_load_and_preprocess_path_and_bytes_agree(tmp_path: Path) -> None:
    pre = Preprocess(image_size=24, channels=3, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    p = tmp_path / "a.jpg"
    p.write_bytes(image_bytes(pattern_image(1, 2, 120), "JPEG"))
    a = load_and_preprocess(p, pre)
    b = load_and_preprocess(p.read_bytes(), pre)
    assert a.shape == (3, 24, 24) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    u = load_uint8(p, pre)
    assert u.dtype == np.uint8 and u.shape == (3, 24, 24)
    np.testing.assert_allclose(normalize_uint8(u, pre), a, atol=1e-6)
    with pytest.raises(ImageLoadError):
        load_and_preprocess(b"", pre)


def test_permission_error_is_mapped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Works as root too: the OS refusal is simulated at the read.
    p = tmp_path / "locked.png"
    p.write_bytes(image_bytes(pattern_image(0, 0, 16), "PNG"))

    def refuse(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", refuse)
    with pytest.raises(ImageLoadError, match=r"^permission denied$"):
        load_image(p, 3)


def test_sparse_huge_file_is_refused_before_reading(tmp_path: Path) -> None:
    import time
    import tracemalloc

    from fewshot_studio.data.images import MAX_FILE_BYTES

    p = tmp_path / "video.jpg"
    with open(p, "wb") as f:
        f.truncate(1536 << 20)  # 1.5 GB, sparse: no disk used
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(ImageLoadError, match=r"^file too large \(1536 MB; the limit is 256"):
            load_image(p, 3)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - t0 < 1.0 and peak < 1 << 20
    assert MAX_FILE_BYTES == 256 << 20


def test_big_file_under_the_limit_reads_the_header_first(tmp_path: Path) -> None:
    import tracemalloc

    from fewshot_studio.data.images import READ_WHOLE_BYTES

    p = tmp_path / "bomb.png"
    with open(p, "wb") as f:  # a bomb header, then sparse padding past the read-whole size
        f.write(png_claiming_size(100_000, 100_000))
        f.truncate(READ_WHOLE_BYTES + (4 << 20))
    tracemalloc.start()
    try:
        with pytest.raises(ImageLoadError, match="decompression bomb"):
            load_image(p, 1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 << 20  # the 20 MB file was not read whole
    good = tmp_path / "big.png"  # a real image padded past the threshold still decodes
    good.write_bytes(image_bytes(pattern_image(1, 0, 40), "PNG"))
    with open(good, "r+b") as f:
        f.truncate(READ_WHOLE_BYTES + 1024)
    assert load_image(good, 3).size == (40, 40)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_fifo_and_specials_are_refused_without_opening(tmp_path: Path) -> None:
    import contextlib
    import threading

    from fewshot_studio.data.images import check_regular_file

    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    result: list[str] = []

    def attempt() -> None:
        try:
            load_image(fifo, 3)
        except ImageLoadError as e:
            result.append(str(e))

    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(3.0)
    if t.is_alive():  # a regression blocks in open(): unblock it, then fail
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        t.join(3.0)
        pytest.fail("loading a FIFO blocked")
    assert result == ["not a regular file"]
    (tmp_path / "dir.jpg").mkdir()
    with pytest.raises(ImageLoadError, match=r"^is a directory$"):
        check_regular_file(tmp_path / "dir.jpg")
    (tmp_path / "loop.jpg").symlink_to(tmp_path / "loop.jpg")
    with pytest.raises(ImageLoadError, match=r"^cannot read file"):
        load_image(tmp_path / "loop.jpg", 3)
    (tmp_path / "dangling.jpg").symlink_to(tmp_path / "nowhere.jpg")
    with pytest.raises(ImageLoadError, match=r"^file not found$"):
        load_image(tmp_path / "dangling.jpg", 3)


def test_read_image_file_reads_small_files_and_defers_big_ones(tmp_path: Path) -> None:
    from fewshot_studio.data.images import READ_WHOLE_BYTES

    small = tmp_path / "a.png"
    data = image_bytes(pattern_image(0, 1, 16), "PNG")
    small.write_bytes(data)
    assert read_image_file(small) == data
    big = tmp_path / "big.png"
    big.write_bytes(data)
    with open(big, "r+b") as f:
        f.truncate(READ_WHOLE_BYTES + 1)
    assert read_image_file(big) is None  # opened by path later, header first
    with pytest.raises(ImageLoadError, match=r"^file not found$"):
        read_image_file(tmp_path / "gone.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageLoadError, match=r"^empty file$"):
        read_image_file(tmp_path / "empty.png")


def test_normalize_constants_and_resize_box() -> None:
    pre = Preprocess(image_size=16, channels=3, mean=(0.5,), std=(0.25,))
    scale, shift = normalize_constants(pre, 3)
    assert scale.shape == shift.shape == (3, 1, 1) and scale.dtype == np.float32
    np.testing.assert_allclose(scale, 1 / (255 * 0.25))
    np.testing.assert_allclose(shift, 2.0)
    crop = Preprocess(image_size=32, resize="center_crop", crop_fraction=0.5)
    assert resize_box(200, 100, crop, 32) == (75.0, 25.0, 125.0, 75.0)
    assert resize_box(200, 100, Preprocess(image_size=32), 32) == (0.0, 0.0, 200.0, 100.0)
