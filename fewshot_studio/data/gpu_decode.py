"""Batched image decoding onto a torch device: nvJPEG for plain JPEGs, Pillow for the rest.

:func:`decode_batch` turns image paths into one ``(n, C, S, S)`` tensor on the device,
preprocessed as ``pre`` says, plus a per-file error. On CUDA, with a torchvision that imports
(lazily, only then: a wheel built for another torch fails to import, which means Pillow), the
plain JPEGs (:func:`plain_jpeg_info`) go to nvJPEG in one batched call and are resized and
normalised on the device by :func:`preprocess_decoded`, which reproduces Pillow's draft scale,
``reducing_gap`` reduce, box resize (22-bit fixed-point weights, uint8 rounding per pass) and
float32 normalisation. Everything else (PNG, CMYK, 16-bit, EXIF-rotated, other formats, corrupt
files, any JPEG nvJPEG fails on) goes through ``load_and_preprocess``: exactly today's tensors
and errors. Without CUDA or torchvision every file takes that path.

Pipelining: :func:`start_batch` reads in a thread pool and returns at once; :func:`finish_batch`
runs the device work, on a side ``stream`` if given; :meth:`DecodedBatch.wait` joins it.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import struct
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fewshot_studio.data.images import (
    MAX_PIXELS,
    ImageLoadError,
    draft_size_for,
    load_and_preprocess,
    normalize_constants,
    read_image_file,
    resize_box,
)
from fewshot_studio.data.preprocess import Preprocess

JpegDecoder = Callable[[list[bytes], bool], list[torch.Tensor]]
"""``decoder(file_bytes_list, gray)`` -> one uint8 ``(C, H, W)`` tensor per file (``C`` = 1 when
``gray``, else 3, RGB) on the target device; raises when any file fails."""

_PRECISION_BITS = 22  # Pillow's Resample.c: 32 - 8 - 2
_CHUNK_ELEMENTS = 1 << 26  # decoded values resized at once (int32: 256 MiB per copy)
_SOF_PLAIN = {0xC0, 0xC2}  # baseline, progressive (Huffman)
_SOF_OTHER = {0xC1, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


# ---------------------------------------------------------------------------------- routing


@dataclass(frozen=True)
class JpegInfo:
    """Header facts of a plain JPEG: stored size (no rotation applies) and one component."""

    width: int
    height: int
    gray: bool


def _exif_orientation(tiff: bytes) -> int | None:
    """The Orientation tag (0x0112) of an EXIF block's IFD0 (``tiff``: the bytes after
    ``Exif\\0\\0``), None when absent. Raises ValueError or struct.error if malformed."""
    order = {b"II*\0": "<", b"MM\0*": ">"}[tiff[:4]]
    (ifd,) = struct.unpack_from(order + "I", tiff, 4)
    (count,) = struct.unpack_from(order + "H", tiff, ifd)
    for i in range(count):
        tag, kind = struct.unpack_from(order + "HH", tiff, ifd + 2 + 12 * i)
        if tag == 0x0112:
            if kind != 3:  # SHORT
                raise ValueError("odd orientation type")
            return int(struct.unpack_from(order + "H", tiff, ifd + 2 + 12 * i + 8)[0])
    return None


@dataclass
class _Header:
    """What :func:`plain_jpeg_info` collects from the markers before the first scan."""

    sof: bytes | None = None
    jfif: bool = False
    adobe: int | None = None  # Adobe APP14 colour transform
    tables: int = 0  # DQT and DHT segments seen (both needed)
    exif_seen: bool = False
    odd: bool = False  # anything that must go to Pillow


def _segment(h: _Header, marker: int, seg: bytes) -> None:
    """Record one marker segment into ``h``."""
    if marker in _SOF_PLAIN:
        h.odd |= h.sof is not None
        h.sof = seg
    elif marker in _SOF_OTHER:
        h.odd = True
    elif marker in (0xC4, 0xDB):
        h.tables |= 1 if marker == 0xDB else 2
    elif marker == 0xE0 and seg.startswith(b"JFIF\0"):
        h.jfif = True
    elif marker == 0xEE and seg.startswith(b"Adobe") and len(seg) >= 12:
        h.adobe = seg[11]
    elif marker == 0xE1 and seg.startswith(b"Exif\0\0") and not h.exif_seen:
        h.exif_seen = True  # Pillow reads the first EXIF block only
        try:
            h.odd |= _exif_orientation(seg[6:]) not in (None, 1)
        except (KeyError, ValueError, struct.error):
            h.odd = True
    elif marker == 0xE1 and seg.startswith(b"http://ns.adobe.com/xap/1.0/"):
        h.odd |= b"Orientation" in seg  # Pillow reads an XMP orientation too
    elif marker == 0xE2 and seg.startswith(b"MPF\0"):
        h.odd = True  # Pillow opens multi-picture files as MPO (no draft scale)


def _header(data: bytes) -> tuple[_Header, int] | None:
    """Walk the markers from SOI to the first SOS: ``(header, SOS offset)``, None if the
    structure is anything but plain."""
    h, pos, n = _Header(), 2, len(data)
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xDA:
            return h, pos
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7 or marker == 0xD9:
            return None
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        seg = data[pos + 4:pos + 2 + length]
        if length < 2 or len(seg) != length - 2:
            return None
        _segment(h, marker, seg)
        if h.odd:
            return None
        pos += 2 + length
    return None


def _plain_frame(h: _Header) -> JpegInfo | None:
    """The SOF of a plain header as :class:`JpegInfo`, None when nvJPEG and libjpeg might
    disagree (precision, components, sampling, colour space) or Pillow would refuse it."""
    sof = h.sof
    if sof is None or h.tables != 3 or len(sof) < 6 or sof[0] != 8:
        return None
    height, width = int.from_bytes(sof[1:3], "big"), int.from_bytes(sof[3:5], "big")
    nc = sof[5]
    if nc not in (1, 3) or len(sof) < 6 + 3 * nc or not 0 < width * height <= MAX_PIXELS:
        return None
    comps = [(sof[6 + 3 * i], sof[7 + 3 * i] >> 4, sof[7 + 3 * i] & 15) for i in range(nc)]
    if nc == 3:
        ids = tuple(c[0] for c in comps)
        rgb = h.adobe == 0 or (not h.jfif and h.adobe is None and ids == (0x52, 0x47, 0x42))
        luma_ok = comps[0][1] in (1, 2) and comps[0][2] in (1, 2)
        if rgb or not luma_ok or any(c[1:] != (1, 1) for c in comps[1:]):
            return None
    return JpegInfo(width, height, nc == 1)


def plain_jpeg_info(data: bytes) -> JpegInfo | None:
    """:class:`JpegInfo` when ``data`` is a JPEG that nvJPEG decodes as Pillow's path would
    (baseline or progressive Huffman, 8-bit, 1 component or 3 in YCbCr with 4:4:4/4:2:2/4:2:0/
    4:4:0 sampling, no EXIF or XMP orientation other than 1, not multi-picture, DQT and DHT
    present, an EOI after the scan, at most ``MAX_PIXELS`` pixels); None for anything else,
    which then goes to Pillow. Reads the markers only (microseconds)."""
    if not data.startswith(b"\xff\xd8"):
        return None
    found = _header(data)
    if found is None:
        return None
    h, sos = found
    if data.rfind(b"\xff\xd9", sos) < 0:  # truncated: Pillow says "truncated file"
        return None
    return _plain_frame(h)


# ---------------------------------------------------------------------- resize on the device


def draft_scale(width: int, height: int, draft_size: int) -> int:
    """The JPEG draft reduction (1, 2, 4 or 8) Pillow picks in ``load_image`` for a
    ``draft_size``: the largest that keeps both sides >= ``draft_size``."""
    scale = min(width // draft_size, height // draft_size)
    return next((s for s in (8, 4, 2) if scale >= s), 1)


@functools.lru_cache(maxsize=512)
def _taps(in_size: int, in0: float, in1: float, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's antialiased bilinear resize of the source span ``[in0, in1)`` (Resample.c:
    ``precompute_coeffs`` on a float32 box, then ``normalize_coeffs_8bpc``'s 22-bit fixed
    point) as ``(out_size, K)`` source indices (int64) and integer weights (int32)."""
    f0, f1 = np.float32(in0), np.float32(in1)
    scale = float(f1 - f0) / out_size
    filterscale = max(scale, 1.0)
    center = float(f0) + (np.arange(out_size) + 0.5) * scale
    lo = np.maximum(np.trunc(center - filterscale + 0.5), 0).astype(np.int64)
    hi = np.minimum(np.trunc(center + filterscale + 0.5), in_size).astype(np.int64)
    ksize = max(int((hi - lo).max()), 1)
    pos = lo[:, None] + np.arange(ksize)[None, :]
    inside = pos < hi[:, None]
    k = np.where(inside, np.clip(1.0 - np.abs((pos - center[:, None] + 0.5)
                                              * (1.0 / filterscale)), 0.0, None), 0.0)
    total = k.sum(axis=1, keepdims=True)
    k = np.divide(k, total, out=k, where=total != 0)
    weights = np.trunc(0.5 + k * float(1 << _PRECISION_BITS)).astype(np.int32)
    return np.minimum(pos, in_size - 1), weights


def _pass(x: torch.Tensor, in0: float, in1: float, size: int, dim: int) -> torch.Tensor:
    """One separable pass of Pillow's resize along ``dim`` (-1 width, -2 height) of int32
    uint8-valued images, in Pillow's integer arithmetic (exact):
    ``clip8((2**21 + sum(pixel * weight)) >> 22)``."""
    idx_np, k_np = _taps(x.shape[dim], in0, in1, size)
    idx = torch.from_numpy(idx_np).to(x.device)
    k = torch.from_numpy(k_np).to(x.device)
    shape = list(x.shape)
    shape[dim] = size
    acc = torch.full(shape, 1 << (_PRECISION_BITS - 1), dtype=torch.int32, device=x.device)
    for t in range(idx.shape[1]):
        if dim == -1:
            acc += x[..., idx[:, t]] * k[:, t]
        else:
            acc += x[..., idx[:, t], :] * k[:, t, None]
    return (acc >> _PRECISION_BITS).clamp_(0, 255)


def _reduce(x: torch.Tensor, fx: int, fy: int) -> torch.Tensor:
    """Pillow's ``Image.reduce((fx, fy))`` of ``(k, C, H, W)`` int32 uint8-valued images:
    block sums (partial blocks at the right and bottom edges over their own pixels), rounded
    as Reduce.c does: ``((sum + n // 2) * (2**24 // n)) >> 24``."""
    if fx == 1 and fy == 1:
        return x
    kernel = (fy, fx)
    total = F.avg_pool2d(x.float(), kernel, ceil_mode=True, divisor_override=1)
    ones = torch.ones((1, 1, *x.shape[-2:]), device=x.device)
    n = F.avg_pool2d(ones, kernel, ceil_mode=True, divisor_override=1).round().long()
    out = ((total.round().long() + n // 2) * ((1 << 24) // n)) >> 24
    return out.to(torch.int32)


def _resize_group(x: torch.Tensor, pre: Preprocess, draft: int) -> torch.Tensor:
    """``(k, C, H, W)`` same-size int32 uint8-valued images -> ``(k, C, S, S)`` as
    ``load_and_preprocess`` resizes them: JPEG draft (``draft`` >= ``draft_size``, 0 for no
    draft), ``reducing_gap=3`` reduce, then the box resize, horizontal pass first."""
    if draft:
        s = draft_scale(x.shape[-1], x.shape[-2], draft)
        x = _reduce(x, s, s)
    size = pre.image_size
    h, w = x.shape[-2:]
    box = resize_box(w, h, pre, size)
    if (w, h) == (size, size) and box == (0.0, 0.0, float(size), float(size)):
        return x
    fx = int((box[2] - box[0]) / size / 3.0) or 1
    fy = int((box[3] - box[1]) / size / 3.0) or 1
    if fx > 1 or fy > 1:  # Image.resize's reducing_gap: reduce the safe box first
        sx, sy = 0.5 * (box[2] - box[0]) / size, 0.5 * (box[3] - box[1]) / size
        rb = (max(0, int(box[0] - sx)), max(0, int(box[1] - sy)),
              min(w, int(np.ceil(box[2] + sx))), min(h, int(np.ceil(box[3] + sy))))
        x = _reduce(x[..., rb[1]:rb[3], rb[0]:rb[2]], fx, fy)
        box = ((box[0] - rb[0]) / fx, (box[1] - rb[1]) / fy,
               (box[2] - rb[0]) / fx, (box[3] - rb[1]) / fy)
        h, w = x.shape[-2:]
    f32 = np.float32
    if size != w or f32(box[0]) != 0 or f32(box[2]) != size:
        x = _pass(x, box[0], box[2], size, -1)
    if size != h or f32(box[1]) != 0 or f32(box[3]) != size:
        x = _pass(x, box[1], box[3], size, -2)
    return x


def preprocess_decoded(images: Sequence[torch.Tensor], pre: Preprocess,
                       draft: bool = True) -> torch.Tensor:
    """Decoded uint8 ``(C, H, W)`` images (``C`` = 1 or 3, all on one device) ->
    float32 ``(n, pre.channels, S, S)`` normalised, on that device, computed as Pillow's path
    computes it from the same pixels (``C`` = 1 with ``pre.channels`` = 3 is replicated, as
    Pillow's L -> RGB). ``draft``: the images are full-size JPEG decodes that Pillow would have
    decoded at the draft scale; emulated by a block average (libjpeg's scaled IDCT is close,
    not equal). Same-size images are resized together (in chunks of at most 2**26 values).

    Parity with Pillow on the same pixels: equal, except that Pillow 13 runs the vertical pass
    first for some shapes where the height shrinks much more than the width (Pillow PR #9549;
    its exact rule is not reproduced here): then values can differ by one uint8 level."""
    c = pre.channels
    out = [torch.empty(0)] * len(images)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault(tuple(im.shape), []).append(i)
    dsize = draft_size_for(pre) if draft else 0
    for same in groups.values():
        step = max(1, _CHUNK_ELEMENTS // images[same[0]].numel())  # bounds the int32 copies
        for c0 in range(0, len(same), step):
            idx = same[c0:c0 + step]
            x = torch.stack([images[i] for i in idx]).to(torch.int32)
            y = _resize_group(x, pre, dsize).to(torch.float32)
            if y.shape[1] != c:
                y = y.expand(-1, c, -1, -1)
            for i, row in zip(idx, y, strict=True):
                out[i] = row
    batch = torch.stack(out)
    scale, shift = normalize_constants(pre, c)
    return batch.mul(torch.from_numpy(scale).to(batch.device)).sub(
        torch.from_numpy(shift).to(batch.device))


# ----------------------------------------------------------------------------------- batches


@functools.lru_cache(maxsize=8)
def nvjpeg_decoder(device: str) -> JpegDecoder | None:
    """torchvision's batched nvJPEG decode onto ``device`` (a CUDA device), or None when the
    device is not CUDA, CUDA is unavailable, or torchvision is missing or fails to import."""
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return None
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except Exception:  # a mismatched torchvision raises RuntimeError/OSError/ImportError
        return None

    def decode(datas: list[bytes], gray: bool) -> list[torch.Tensor]:
        mode = ImageReadMode.GRAY if gray else ImageReadMode.RGB
        raw = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
        return list(decode_jpeg(raw, mode=mode, device=dev))

    try:  # a torchvision without its image extension imports, then fails on every call
        probe = io.BytesIO()
        Image.new("RGB", (16, 8), (200, 30, 30)).save(probe, "JPEG")
        ok = decode([probe.getvalue()], False)[0].shape == (3, 8, 16)
    except Exception:
        ok = False
    return decode if ok else None


@dataclass
class _Item:
    """One file after the CPU stage: JPEG bytes for nvJPEG, or Pillow's array, or an error."""

    jpeg: bytes | None = None
    gray: bool = False
    height: int = 0
    width: int = 0
    array: np.ndarray | None = None
    error: Exception | None = None


def _pillow(source: str | os.PathLike | bytes, pre: Preprocess) -> _Item:
    try:
        return _Item(array=load_and_preprocess(source, pre))
    except Exception as e:  # the engine maps any exception to an error row, as today
        return _Item(error=e)


def _read(path: str | os.PathLike, pre: Preprocess, route: bool) -> _Item:
    """Read one file; a plain JPEG (when ``route``) stays bytes, anything else is decoded by
    Pillow here (big files by path, header first, as today)."""
    try:
        data = read_image_file(path)
    except ImageLoadError as e:
        return _Item(error=e)
    info = plain_jpeg_info(data) if route and data is not None else None
    if info is None:
        return _pillow(path if data is None else data, pre)
    return _Item(jpeg=data, gray=info.gray or pre.channels == 1, height=info.height,
                 width=info.width)


@dataclass
class PendingBatch:
    """:func:`start_batch`'s result: the reads in flight."""

    items: list[Future[_Item] | _Item]
    pre: Preprocess
    device: torch.device
    decoder: JpegDecoder | None


@dataclass
class DecodedBatch:
    """``images``: ``(n, C, S, S)`` on the device (dtype and memory format as asked), zeros in
    the rows of failed files; ``errors[i]``: the exception for file ``i`` (an
    :class:`~fewshot_studio.data.images.ImageLoadError` with today's one-line reason for a bad
    file), None if it decoded; ``nvjpeg[i]``: True when nvJPEG decoded it. ``ready``: the
    event to wait for when the work ran on a side stream (see :meth:`wait`)."""

    images: torch.Tensor
    errors: list[Exception | None]
    nvjpeg: list[bool]
    ready: torch.cuda.Event | None = None

    def wait(self) -> torch.Tensor:
        """``images``, safe to use on the current stream (it waits for the decode stream's
        event and tells the allocator the tensor is used there)."""
        if self.ready is not None:
            current = torch.cuda.current_stream(self.images.device)
            current.wait_event(self.ready)
            self.images.record_stream(current)
        return self.images


def start_batch(paths: Sequence[str | os.PathLike], pre: Preprocess,
                device: str | torch.device = "cuda", pool: Executor | None = None,
                jpeg_decoder: JpegDecoder | None = None) -> PendingBatch:
    """Submit the CPU stage (read, route, Pillow-decode the non-JPEGs) to ``pool`` (inline
    when None) and return at once. ``jpeg_decoder`` defaults to :func:`nvjpeg_decoder`; when
    there is none every file goes to Pillow. Call from a thread that is not one of ``pool``'s
    workers."""
    dev = torch.device(device)
    decoder = jpeg_decoder or nvjpeg_decoder(str(dev))
    route = decoder is not None
    items: list[Future[_Item] | _Item] = [
        pool.submit(_read, p, pre, route) if pool is not None else _read(p, pre, route)
        for p in paths]
    return PendingBatch(items, pre, dev, decoder)


def _decode_jpegs(decoder: JpegDecoder, datas: list[bytes], gray: bool
                  ) -> list[torch.Tensor | None]:
    """Batched decode; if the batch fails, file by file (None for a file that fails)."""
    try:
        return list(decoder(datas, gray))
    except Exception:
        out: list[torch.Tensor | None] = []
        for d in datas:
            try:
                out.append(decoder([d], gray)[0])
            except Exception:
                out.append(None)
        return out


def _gpu_rows(batch: PendingBatch, items: list[_Item], out: torch.Tensor) -> list[bool]:
    """Decode the JPEG items with the decoder into ``out``; items it fails on (or decodes to
    an unexpected shape) are redone by Pillow in place. Returns which rows it decoded."""
    done = [False] * len(items)
    for gray in (True, False):
        idx = [i for i, it in enumerate(items) if it.jpeg is not None and it.gray == gray]
        if not idx or batch.decoder is None:
            continue
        decoded = _decode_jpegs(batch.decoder, [items[i].jpeg for i in idx], gray)  # type: ignore[misc]
        good: list[tuple[int, torch.Tensor]] = []
        for i, t in zip(idx, decoded, strict=True):
            it = items[i]
            want = (1 if gray else 3, it.height, it.width)
            if t is not None and tuple(t.shape) == want:
                good.append((i, t))
            else:
                items[i] = _pillow(it.jpeg, batch.pre)  # type: ignore[arg-type]
        if good:
            rows = [i for i, _ in good]
            x = preprocess_decoded([t.to(out.device) for _, t in good], batch.pre)
            out[rows] = x
            for i in rows:
                done[i] = True
    return done


def finish_batch(batch: PendingBatch, stream: torch.cuda.Stream | None = None,
                 dtype: torch.dtype = torch.float32, channels_last: bool = False
                 ) -> DecodedBatch:
    """Wait for the reads, decode the JPEGs on the device and assemble the batch (on
    ``stream`` when given: then use :meth:`DecodedBatch.wait`). ``dtype`` / ``channels_last``:
    the output's dtype and memory format (computed in float32, cast at the end)."""
    items = [f.result() if isinstance(f, Future) else f for f in batch.items]
    pre, dev = batch.pre, batch.device
    ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
    ready = None
    with ctx:
        out = torch.zeros((len(items), pre.channels, pre.image_size, pre.image_size),
                          dtype=torch.float32, device=dev)
        done = _gpu_rows(batch, items, out)
        cpu = [i for i, it in enumerate(items) if it.array is not None]
        if cpu:
            host = torch.from_numpy(np.stack([items[i].array for i in cpu]))  # type: ignore[misc]
            if dev.type == "cuda":
                host = host.pin_memory()
            out[cpu] = host.to(dev, non_blocking=True)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        out = out.to(dtype=dtype, memory_format=fmt)
        if stream is not None:
            ready = torch.cuda.Event()
            ready.record(stream)
    return DecodedBatch(out, [it.error for it in items], done, ready)


def decode_batch(paths: Sequence[str | os.PathLike], pre: Preprocess,
                 device: str | torch.device = "cuda", pool: Executor | None = None,
                 stream: torch.cuda.Stream | None = None, dtype: torch.dtype = torch.float32,
                 channels_last: bool = False, jpeg_decoder: JpegDecoder | None = None
                 ) -> DecodedBatch:
    """:func:`start_batch` then :func:`finish_batch`: ``paths`` -> ``(n, C, S, S)`` on
    ``device`` plus per-file errors. Without CUDA + torchvision (and no ``jpeg_decoder``), the
    rows are exactly ``load_and_preprocess``'s."""
    return finish_batch(start_batch(paths, pre, device, pool, jpeg_decoder), stream, dtype,
                        channels_last)
