"""Generators for tiny image datasets and planted bad files, shared by the data, engine and GUI
tests. Plain functions (no pytest fixtures) so any test can call them with its ``tmp_path``.

    from fixtures_data import make_class_folder, make_class_zip, write_bad_files
"""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def pattern_image(cls: int, idx: int, size: int = 32, mode: str = "RGB") -> Image.Image:
    """A deterministic image whose content depends mostly on the class (learnable) and a bit on
    the index: class-specific stripes/blocks plus a small per-image shift and noise."""
    rng = np.random.default_rng(cls * 1000 + idx)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    freq = 1 + cls % 5
    angle = (cls * 0.7) % np.pi
    shift = idx % 4
    base = np.sin(freq * ((xx + shift) * np.cos(angle) + yy * np.sin(angle)) / size * 2 * np.pi)
    img = (base * 0.5 + 0.5) * 200 + rng.normal(0, 10, (size, size))
    gray = np.clip(img, 0, 255).astype(np.uint8)
    if mode == "L":
        return Image.fromarray(gray, "L")
    tint = np.array([(cls * 53) % 256, (cls * 97) % 256, (cls * 151) % 256], np.float32)
    rgb = np.clip(gray[..., None] * 0.7 + tint * 0.3, 0, 255).astype(np.uint8)
    return Image.fromarray(rgb, "RGB")


def image_bytes(img: Image.Image, fmt: str = "PNG", **save_kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save_kw)
    return buf.getvalue()


def _class_name(c: int, nested: bool) -> str:
    return f"alpha{c // 3}/char{c % 3:02d}" if nested else f"class{c:02d}"


def make_class_folder(
    root: Path,
    n_classes: int = 5,
    n_per_class: int = 6,
    size: int = 32,
    nested: bool = False,
    mode: str = "RGB",
    fmt: str = "png",
) -> list[str]:
    """Write ``root/<class>/<i>.<fmt>`` (or ``root/alphaK/charNN/...`` when ``nested``).
    Returns the class names in sorted order."""
    names = []
    for c in range(n_classes):
        name = _class_name(c, nested)
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            pattern_image(c, i, size, mode).save(d / f"{i:03d}.{fmt}")
        names.append(name)
    return sorted(names)


def make_class_zip(
    path: Path,
    n_classes: int = 5,
    n_per_class: int = 6,
    size: int = 32,
    nested: bool = False,
    mode: str = "RGB",
    top_folder: str | None = "dataset",
    fmt: str = "PNG",
) -> list[str]:
    """Write a zip with ``[top_folder/]<class>/<i>.png`` members. Returns sorted class names."""
    names = []
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for c in range(n_classes):
            name = _class_name(c, nested)
            prefix = f"{top_folder}/{name}" if top_folder else name
            for i in range(n_per_class):
                data = image_bytes(pattern_image(c, i, size, mode), fmt)
                z.writestr(f"{prefix}/{i:03d}.{fmt.lower()}", data)
            names.append(name)
    return sorted(names)


def png_claiming_size(width: int, height: int) -> bytes:
    """A tiny (invalid-bodied) PNG whose header claims ``width`` x ``height`` pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def exif_rotated_jpeg(width: int = 40, height: int = 20, orientation: int = 6) -> bytes:
    """A JPEG of ``width`` x ``height`` stored pixels with an EXIF orientation tag."""
    img = Image.new("RGB", (width, height), (200, 30, 30))
    img.paste((30, 30, 200), (0, 0, width // 4, height))  # blue band on the left
    exif = Image.Exif()
    exif[0x0112] = orientation
    return image_bytes(img, "JPEG", exif=exif.tobytes(), quality=95)


def bad_file_bytes() -> dict[str, tuple[bytes, str]]:
    """name -> (file bytes, expected reason substring) for files that must fail to load."""
    good_jpg = image_bytes(pattern_image(1, 1, 64), "JPEG", quality=90)
    good_png = image_bytes(pattern_image(2, 1, 64), "PNG")
    return {
        "empty.jpg": (b"", "empty file"),
        "truncated.jpg": (good_jpg[: len(good_jpg) // 2], "truncated"),
        "truncated.png": (good_png[: len(good_png) // 2], "truncated"),
        "text.png": (b"this is not an image at all\n" * 20, "not an image"),
        "bomb.png": (png_claiming_size(100_000, 100_000), "decompression bomb"),
    }


def odd_file_bytes() -> dict[str, bytes]:
    """name -> bytes of readable images in unusual formats (must load fine)."""
    cmyk = Image.new("CMYK", (24, 16), (0, 255, 255, 0))  # pure red in CMYK
    sixteen = Image.fromarray(np.full((16, 24), 65535, np.uint16))
    sixteen = sixteen if sixteen.mode.startswith("I") else sixteen.convert("I;16")
    pal = Image.new("P", (24, 16), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    la = Image.new("LA", (24, 16), (0, 0))
    return {
        "cmyk.jpg": image_bytes(cmyk, "JPEG", quality=95),
        "sixteen.png": image_bytes(sixteen, "PNG"),
        "palette_alpha.png": image_bytes(pal, "PNG", transparency=0),
        "la.png": image_bytes(la, "PNG"),
        "exif6.jpg": exif_rotated_jpeg(),
        "画像_é.png": image_bytes(pattern_image(3, 0, 20), "PNG"),
    }


def write_bad_files(folder: Path) -> dict[str, str]:
    """Write every bad file into ``folder``; returns name -> expected reason substring."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, (data, reason) in bad_file_bytes().items():
        (folder / name).write_bytes(data)
        out[name] = reason
    return out


def write_odd_files(folder: Path) -> list[str]:
    """Write every odd-but-readable file into ``folder``; returns their names."""
    folder.mkdir(parents=True, exist_ok=True)
    files = odd_file_bytes()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return sorted(files)


def make_alphabet_folder(
    root: Path,
    chars_per_alphabet: tuple[int, ...] = (4, 3, 2),
    n_drawers: int = 5,
    size: int = 28,
    mode: str = "L",
) -> list[str]:
    """Write an Omniglot-like nested layout ``root/alphaK/charNN/<cid>_<drawer>.png``: alphabet
    K has ``chars_per_alphabet[K]`` characters, each drawn once by drawers 01..``n_drawers``
    (the file-name suffix ``_NN``, as in ``0965_17.png``). Returns the class names, sorted."""
    names = []
    cid = 0
    for k, n_chars in enumerate(chars_per_alphabet):
        for c in range(n_chars):
            name = f"alpha{k}/char{c:02d}"
            d = root / name
            d.mkdir(parents=True, exist_ok=True)
            for drawer in range(1, n_drawers + 1):
                pattern_image(cid, drawer, size, mode).save(d / f"{cid:04d}_{drawer:02d}.png")
            names.append(name)
            cid += 1
    return sorted(names)
