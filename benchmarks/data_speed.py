"""Data-path speed: JPEG decode+resize (with / without draft mode) and Omniglot preload.

    .venv/bin/python benchmarks/data_speed.py [--n 300] [--workers 2] [--skip-omniglot]

Prints images/s for 500x375 JPEGs decoded to 84 px (squash, RGB) and 224 px
(center_crop, RGB), the draft-mode speed-up ratio, and the time to preload the full Omniglot
background zip (19,280 images -> 28 px, 4 rotations -> 3,856 classes).
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
from PIL import Image

from fewshot_studio.data.datasets import OMNIGLOT_PRE, omniglot_dataset, preload
from fewshot_studio.data.images import load_image, preprocess_image
from fewshot_studio.data.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess


def _jpegs(n: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    base = rng.integers(0, 255, (375 // 5, 500 // 5, 3), dtype=np.uint8)
    big = Image.fromarray(base).resize((500, 375), Image.Resampling.BICUBIC)
    for i in range(n):
        buf = io.BytesIO()
        big.rotate(i % 360).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _rate(data: list[bytes], pre: Preprocess, draft: bool) -> float:
    t0 = time.perf_counter()
    for d in data:
        img = load_image(d, pre.channels, draft_size=pre.image_size if draft else None)
        preprocess_image(img, pre)
    return len(data) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--skip-omniglot", action="store_true")
    args = ap.parse_args()
    data = _jpegs(args.n)
    cases = {
        "84px RGB squash": Preprocess(84, 3, IMAGENET_MEAN, IMAGENET_STD, "squash"),
        "224px RGB center_crop": Preprocess(224, 3, IMAGENET_MEAN, IMAGENET_STD, "center_crop"),
    }
    print(f"{args.n} JPEGs 500x375, one thread, decode+resize+normalise:")
    for name, pre in cases.items():
        full, fast = _rate(data, pre, False), _rate(data, pre, True)
        print(
            f"  {name:24s} full decode {full:7.1f} img/s  draft {fast:7.1f} img/s  "
            f"ratio {fast / full:4.2f}x"
        )
    if not args.skip_omniglot:
        ds = omniglot_dataset("background")
        t0 = time.perf_counter()
        mem = preload(ds, OMNIGLOT_PRE, rotations=(0, 90, 180, 270), num_workers=args.workers)
        dt = time.perf_counter() - t0
        print(
            f"Omniglot background preload ({args.workers} threads): {len(ds)} files -> "
            f"{tuple(mem.images.shape)} uint8, {mem.num_classes} classes in {dt:.2f} s "
            f"({len(ds) / dt:.0f} files/s)"
        )


if __name__ == "__main__":
    main()
