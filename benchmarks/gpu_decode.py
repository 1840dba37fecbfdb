"""GPU decode speed and parity: Pillow threads vs nvJPEG (data/gpu_decode.py) on 500x375 JPEGs.

    .venv/bin/python benchmarks/gpu_decode.py [--n 2048] [--batch 256] [--workers 16]
                                              [--size 224]

Needs a CUDA device and a torchvision that matches torch (the `gpu` extra); otherwise prints
"no CUDA device: skipped" (or why nvJPEG is unavailable) and exits 0. Writes N generated JPEGs
to a temporary folder, then times, for decode + resize + normalise to ``--size`` (RGB,
ImageNet statistics, center_crop):

- Pillow: ``load_and_preprocess`` (JPEG draft mode) in a pool of ``--workers`` threads, and the
  host-to-device copy of the batch;
- nvJPEG: ``decode_batch`` (file reads in the same pool, batched nvJPEG decode, the torch
  resize on the GPU), one batch at a time, and pipelined (``start_batch`` for the next batch
  while ``finish_batch`` runs the current one on a side CUDA stream).

Parity: mean / 99th percentile / max difference between the two paths in uint8 levels.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fewshot_studio.data.gpu_decode import (
    decode_batch,
    finish_batch,
    nvjpeg_decoder,
    start_batch,
)
from fewshot_studio.data.images import load_and_preprocess
from fewshot_studio.data.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess


def _write_jpegs(folder: Path, n: int) -> list[Path]:
    """``n`` 500x375 JPEGs (quality 90): a smooth random picture, rotated per file."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (375 // 5, 500 // 5, 3), dtype=np.uint8)
    big = Image.fromarray(base).resize((500, 375), Image.Resampling.BICUBIC)
    paths = []
    for i in range(n):
        buf = io.BytesIO()
        big.rotate(i % 360).save(buf, "JPEG", quality=90)
        p = folder / f"{i:05d}.jpg"
        p.write_bytes(buf.getvalue())
        paths.append(p)
    return paths


def _batches(paths: list[Path], size: int) -> list[list[Path]]:
    return [paths[i:i + size] for i in range(0, len(paths), size)]


def _pillow(paths: list[Path], pre: Preprocess, batch: int, pool: ThreadPoolExecutor
            ) -> tuple[float, torch.Tensor]:
    t0 = time.perf_counter()
    last = torch.empty(0)
    for chunk in _batches(paths, batch):
        rows = list(pool.map(lambda p: load_and_preprocess(p, pre), chunk))
        last = torch.from_numpy(np.stack(rows)).pin_memory().to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    return len(paths) / (time.perf_counter() - t0), last


def _nvjpeg(paths: list[Path], pre: Preprocess, batch: int, pool: ThreadPoolExecutor
            ) -> tuple[float, torch.Tensor]:
    t0 = time.perf_counter()
    last = torch.empty(0)
    for chunk in _batches(paths, batch):
        last = decode_batch(chunk, pre, "cuda", pool=pool).images
    torch.cuda.synchronize()
    return len(paths) / (time.perf_counter() - t0), last


def _pipelined(paths: list[Path], pre: Preprocess, batch: int, pool: ThreadPoolExecutor
               ) -> float:
    stream = torch.cuda.Stream()
    chunks = _batches(paths, batch)
    t0 = time.perf_counter()
    pending = start_batch(chunks[0], pre, "cuda", pool)
    for k in range(len(chunks)):
        nxt = start_batch(chunks[k + 1], pre, "cuda", pool) if k + 1 < len(chunks) else None
        finish_batch(pending, stream=stream).wait()
        if nxt is not None:
            pending = nxt
    torch.cuda.synchronize()
    return len(paths) / (time.perf_counter() - t0)


def _parity(paths: list[Path], pre: Preprocess, pool: ThreadPoolExecutor) -> str:
    gpu = decode_batch(paths, pre, "cuda", pool=pool)
    ref = np.stack(list(pool.map(lambda p: load_and_preprocess(p, pre), paths)))
    std = np.asarray(pre.std, np.float64)[:, None, None]
    d = np.abs(gpu.images.cpu().numpy().astype(np.float64) - ref) * 255.0 * std
    return (f"{sum(gpu.nvjpeg)}/{len(paths)} by nvJPEG; difference in uint8 levels: "
            f"mean {d.mean():.3f}, p99 {np.percentile(d, 99):.1f}, max {d.max():.1f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--workers", type=int, default=16)
    ap.add_argument("--size", type=int, default=224)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: skipped")
        return
    if nvjpeg_decoder("cuda") is None:
        print("CUDA present but torchvision (nvJPEG) does not import: skipped")
        return
    pre = Preprocess(args.size, 3, IMAGENET_MEAN, IMAGENET_STD, "center_crop")
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(args.workers) as pool:
        paths = _write_jpegs(Path(tmp), args.n)
        _nvjpeg(paths[:args.batch], pre, args.batch, pool)  # warm-up: CUDA, nvJPEG handles
        _pillow(paths[:args.batch], pre, args.batch, pool)
        print(f"{args.n} JPEGs 500x375 -> {args.size} px RGB center_crop, batch {args.batch}, "
              f"{args.workers} threads, {torch.cuda.get_device_name()}:")
        rate, _ = _pillow(paths, pre, args.batch, pool)
        print(f"  Pillow (draft) threads + H2D copy  {rate:8.0f} img/s")
        rate, _ = _nvjpeg(paths, pre, args.batch, pool)
        print(f"  nvJPEG + GPU resize                {rate:8.0f} img/s")
        rate = _pipelined(paths, pre, args.batch, pool)
        print(f"  nvJPEG pipelined (side stream)     {rate:8.0f} img/s")
        print("  parity:", _parity(paths[:args.batch], pre, pool))


if __name__ == "__main__":
    main()
