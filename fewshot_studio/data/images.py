"""Robust image loading and preprocessing, shared by the trainer, the engine and the GUI.

Everything that can go wrong with a file on disk (empty, truncated, not an image, a
decompression bomb, unreadable, not a regular file, too large) becomes an
:class:`ImageLoadError` whose ``str`` is a short, one-line reason fit for a CSV cell or a tile
tooltip. Sizes are checked before reading: :func:`check_regular_file` (``stat`` only; a FIFO
or device is never opened, a file over :data:`MAX_FILE_BYTES` never read), then the header
(pixel count against :data:`MAX_PIXELS`) before the pixels are decoded.

Odd pixel formats (palette with transparency, LA/RGBA, 16-bit, CMYK, 1-bit) are converted to
``L`` or ``RGB``; EXIF orientation is applied. For JPEGs a ``draft_size`` lets libjpeg decode
at 1/2, 1/4 or 1/8 scale (never below ``draft_size`` on either side), which is most of the
speed of decoding big photos to a small model input.
"""

from __future__ import annotations

import io
import math
import os
import re
import stat
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from fewshot_studio.data.preprocess import Preprocess

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
)
"""Lower-case file suffixes treated as images when scanning folders and zips."""

MAX_PIXELS: int = 89_478_485
"""Decompression-bomb guard: images with more pixels than this are refused (PIL's default)."""

MAX_FILE_BYTES: int = 256 << 20
"""Files larger than this (256 MiB; messages say "MB" for MiB) are refused before any byte
is read: no real photo is that big, while a video or disk image named ``*.jpg`` would
otherwise be read whole."""

READ_WHOLE_BYTES: int = 16 << 20
"""Files up to this size (16 MiB) are read in one call (fast, handle closed at once); larger
ones are opened lazily so the header (and its pixel-count check) is read before the pixels."""

# We refuse bombs ourselves with a clear ImageLoadError; PIL's warning would only be noise.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

ImageSource = str | os.PathLike | bytes


class ImageLoadError(Exception):
    """An image that cannot be read. ``str(e)`` is a one-line human reason, e.g. "empty file",
    "truncated file", "not an image", "decompression bomb (N pixels)", "permission denied"."""


def is_image_path(name: str | os.PathLike) -> bool:
    """True when the file name has an image extension and is not hidden."""
    base = os.path.basename(os.fspath(name))
    return not base.startswith(".") and os.path.splitext(base)[1].lower() in IMAGE_EXTENSIONS


def _one_line(msg: object) -> str:
    text = " ".join(str(msg).split())
    return text[:200] if text else "unknown error"


def _reason(exc: BaseException) -> str:
    """A short reason for a decode failure."""
    msg = str(exc).lower()
    if "truncated" in msg or isinstance(exc, EOFError) or "unexpected end" in msg:
        return "truncated file"
    if isinstance(exc, MemoryError):
        return "out of memory decoding image"
    return f"corrupt image ({_one_line(exc)})"


def _file_error(e: OSError) -> ImageLoadError:
    """A file-system error as a one-line :class:`ImageLoadError`."""
    if isinstance(e, FileNotFoundError):
        return ImageLoadError("file not found")
    if isinstance(e, PermissionError):
        return ImageLoadError("permission denied")
    return ImageLoadError(f"cannot read file ({_one_line(e.strerror or e)})")


def check_regular_file(path: str | os.PathLike, max_bytes: int = MAX_FILE_BYTES
                       ) -> os.stat_result:
    """``os.stat(path)`` of a file that is safe to open and read: a regular file (symlinks
    followed), not empty, at most ``max_bytes``. Raises :class:`ImageLoadError` ("file not
    found", "is a directory", "not a regular file", "empty file", "file too large (N MB)", ...)
    otherwise. Nothing is opened: a FIFO or device would block or never end."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise _file_error(e) from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageLoadError("is a directory")
    if not stat.S_ISREG(st.st_mode):
        raise ImageLoadError("not a regular file")
    if st.st_size == 0:
        raise ImageLoadError("empty file")
    if st.st_size > max_bytes:
        raise ImageLoadError(f"file too large ({st.st_size / 2**20:.0f} MB; "
                             f"the limit is {max_bytes / 2**20:.0f} MB)")
    return st


def read_image_file(path: str | os.PathLike) -> bytes | None:
    """The bytes of an image file checked by :func:`check_regular_file`, read in one call
    (fast, handle closed at once), or None for a file over :data:`READ_WHOLE_BYTES`, which
    must be opened by path so its header (and pixel-count check) is read before the pixels.
    Raises :class:`ImageLoadError` ("file not found", "permission denied", ...)."""
    st = check_regular_file(path)
    if st.st_size > READ_WHOLE_BYTES:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise _file_error(e) from None


def _open(source: ImageSource) -> Image.Image:
    """Open lazily (header only); map file-system errors to ImageLoadError. Paths are checked
    with :func:`check_regular_file` first; small files are read whole, big ones opened by path
    (PIL closes the handle once the pixels are loaded)."""
    fp: io.BytesIO | str
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageLoadError("empty file")
        fp = io.BytesIO(source)
    else:
        data = read_image_file(source)
        fp = os.fspath(source) if data is None else io.BytesIO(data)
    try:
        return Image.open(fp)
    except Image.UnidentifiedImageError:
        raise ImageLoadError("not an image") from None
    except OSError as e:
        if e.errno is not None:  # opening a big file by path (decoder errors have none)
            raise _file_error(e) from None
        raise ImageLoadError(_reason(e)) from None
    except Image.DecompressionBombError as e:
        m = re.search(r"\((\d+) pixels\)", str(e))
        n = m.group(1) if m else "too many"
        raise ImageLoadError(f"decompression bomb ({n} pixels)") from None
    except Exception as e:  # any decoder error in the header
        raise ImageLoadError(_reason(e)) from None


def _sixteen_bit_to_l(img: Image.Image) -> Image.Image:
    """I;16* / I / F -> L, scaling the full range down (PIL's convert would clip at 255)."""
    a = np.asarray(img)
    if a.dtype.kind == "f":
        a = a.astype(np.float64)
        a = a * 255.0 if a.size and float(a.max()) <= 1.0 else a
    elif img.mode.startswith("I;16") or (a.size and int(a.max()) > 255):
        a = a.astype(np.float64) / 257.0
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")


def _composite_on_white(img: Image.Image) -> Image.Image:
    """Any mode with alpha -> RGB composited over white."""
    rgba = img.convert("RGBA")
    bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(bg, rgba).convert("RGB")


def _to_mode(img: Image.Image, channels: int) -> Image.Image:
    mode = img.mode
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
    elif mode == "PA":
        img = img.convert("RGBA")
        mode = img.mode
    if mode in ("LA", "La", "RGBA", "RGBa"):
        img = _composite_on_white(img)
    elif mode.startswith("I") or mode == "F":
        img = _sixteen_bit_to_l(img)
    elif mode == "1":
        img = img.convert("L")
    target = "L" if channels == 1 else "RGB"
    if img.mode != target:
        img = img.convert(target)  # CMYK, YCbCr, LAB, HSV, RGB<->L
    return img


def load_image(
    source: ImageSource,
    channels: int,
    draft_size: int | None = None,
    max_pixels: int | None = None,
) -> Image.Image:
    """Decode ``source`` (a path or the file's bytes) fully into mode ``L`` (``channels=1``) or
    ``RGB`` (``channels=3``), EXIF orientation applied, alpha composited on white.

    ``draft_size``: for JPEGs, let libjpeg decode at a reduced scale whose sides stay
    >= ``draft_size`` (pass the smallest side the later resize needs). ``max_pixels``
    overrides :data:`MAX_PIXELS`. Raises :class:`ImageLoadError` for anything unreadable.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, not {channels}")
    limit = MAX_PIXELS if max_pixels is None else max_pixels
    img = _open(source)
    try:
        w, h = img.size
        if w <= 0 or h <= 0:
            raise ImageLoadError("corrupt image (zero size)")
        if w * h > limit:
            raise ImageLoadError(f"decompression bomb ({w * h} pixels)")
        if draft_size and img.format == "JPEG":
            img.draft("L" if channels == 1 else "RGB", (draft_size, draft_size))
        try:
            img.load()
            ImageOps.exif_transpose(img, in_place=True)
            img = _to_mode(img, channels)
            img.load()
        except ImageLoadError:
            raise
        except Exception as e:
            raise ImageLoadError(_reason(e)) from None
        return img
    except BaseException:
        img.close()
        raise


def resize_box(w: int, h: int, pre: Preprocess, size: int) -> tuple[float, float, float, float]:
    """Source box to resize into a ``size`` square (whole image for "squash", centre crop for
    "center_crop": shorter side scaled to size/crop_fraction, then the central square)."""
    if pre.resize == "squash":
        return (0.0, 0.0, float(w), float(h))
    if pre.resize == "center_crop":
        short = min(w, h)
        side = short * min(1.0, pre.crop_fraction)  # crop side in source pixels
        left, top = (w - side) / 2.0, (h - side) / 2.0
        return (left, top, left + side, top + side)
    raise ValueError(f"unknown resize mode {pre.resize!r} (squash | center_crop)")


def draft_size_for(pre: Preprocess, size: int | None = None) -> int:
    """The smallest side a decode may be reduced to before :func:`resize_image` (for JPEG draft)."""
    s = size or pre.image_size
    if pre.resize == "center_crop":
        return math.ceil(s / min(1.0, pre.crop_fraction))
    return s


def resize_image(img: Image.Image, pre: Preprocess, size: int | None = None) -> Image.Image:
    """Resize (antialiased bilinear) to a ``size`` square (default ``pre.image_size``) as
    ``pre.resize`` says. One PIL call with a source box, so a crop costs nothing extra."""
    s = size or pre.image_size
    box = resize_box(img.width, img.height, pre, s)
    if img.size == (s, s) and box == (0.0, 0.0, float(s), float(s)):
        return img
    return img.resize((s, s), Image.Resampling.BILINEAR, box=box, reducing_gap=3.0)


def image_to_uint8(img: Image.Image) -> np.ndarray:
    """PIL ``L``/``RGB`` image -> uint8 array (C, H, W)."""
    a = np.asarray(img, dtype=np.uint8)
    if a.ndim == 2:
        return a[None].copy()
    return np.ascontiguousarray(a.transpose(2, 0, 1))


def normalize_uint8(a: np.ndarray, pre: Preprocess) -> np.ndarray:
    """uint8 (C, H, W) or (B, C, H, W) -> float32 ``(x / 255 - mean) / std`` per channel."""
    scale, shift = normalize_constants(pre, a.shape[-3])
    return (a.astype(np.float32) * scale - shift).astype(np.float32, copy=False)


def normalize_constants(pre: Preprocess, c: int) -> tuple[np.ndarray, np.ndarray]:
    """float32 ``(scale, shift)``, each ``(c, 1, 1)``: normalised = ``x * scale - shift`` for
    uint8 values ``x`` (``scale = 1 / (255 std)``, ``shift = mean / std``). The GPU decode
    (:mod:`.gpu_decode`) applies the same two float32 operations."""
    mean = np.asarray(pre.mean, dtype=np.float32)
    std = np.asarray(pre.std, dtype=np.float32)
    if mean.size == 1 and c > 1:
        mean = np.repeat(mean, c)
    if std.size == 1 and c > 1:
        std = np.repeat(std, c)
    scale = (1.0 / (255.0 * std)).reshape(c, 1, 1)
    shift = (mean / std).reshape(c, 1, 1)
    return scale, shift


def preprocess_uint8(img: Image.Image, pre: Preprocess, size: int | None = None) -> np.ndarray:
    """Loaded image -> resized uint8 array (C, H, W): what :func:`preprocess_image` normalises.
    The trainer stores these (uint8 at rest) and normalises on the device."""
    return image_to_uint8(resize_image(img, pre, size))


def preprocess_image(img: Image.Image, pre: Preprocess) -> np.ndarray:
    """Loaded image (mode matching ``pre.channels``) -> float32 (C, H, W), resized as
    ``pre.resize`` says and normalised by ``pre.mean`` / ``pre.std``."""
    want = "L" if pre.channels == 1 else "RGB"
    if img.mode != want:
        img = _to_mode(img, pre.channels)
    return normalize_uint8(preprocess_uint8(img, pre), pre)


def load_and_preprocess(
    source: ImageSource, pre: Preprocess, max_pixels: int | None = None
) -> np.ndarray:
    """:func:`load_image` with a JPEG draft size fit for ``pre``, then :func:`preprocess_image`.
    Returns float32 (C, H, W); raises :class:`ImageLoadError`."""
    img = load_image(source, pre.channels, draft_size=draft_size_for(pre), max_pixels=max_pixels)
    try:
        return preprocess_image(img, pre)
    finally:
        img.close()


def load_uint8(
    source: ImageSource, pre: Preprocess, size: int | None = None, max_pixels: int | None = None
) -> np.ndarray:
    """Like :func:`load_and_preprocess` but stops before normalisation: uint8 (C, H, W)."""
    img = load_image(
        source, pre.channels, draft_size=draft_size_for(pre, size), max_pixels=max_pixels
    )
    try:
        return preprocess_uint8(img, pre, size)
    finally:
        img.close()
