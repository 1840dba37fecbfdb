"""How ``fewshot-studio duplicates`` separates copies from different photos: the similarity of
each resized copy to its original against the highest similarity of two different photos of
one class, for the pixel signature (what ``duplicates`` uses) and, with ``--embeddings``, a
checkpoint's embeddings (what it does not use, and why).

Images: generated scenes (a class is one smooth random texture; its photos are different
crops of it with their own brightness and noise), generated objects (a class is a textured
blob on a light background, placed, sized and lit differently in each photo, as in
``tests/test_duplicates.py``), both saved as JPEG quality 90, and, with
``--caltech ZIP``, the first 6 images of 10 Caltech-101 classes. Every third image gets a copy
resized to 2/3 and saved as JPEG quality 60 (and, shown apart, a 1/2-size quality-40 copy).

    python benchmarks/duplicate_threshold.py [--caltech caltech101.zip]
        [--embeddings natural-protonet]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from fewshot_studio.engine.duplicates import DEFAULT_THRESHOLD, pixel_signature

CALTECH_CLASSES = ("airplanes", "Faces_easy", "Motorbikes", "watch", "car_side", "leopards",
                   "ketch", "chandelier", "bonsai", "hawksbill")


def scene(cls: int, idx: int, w: int = 240, h: int = 180) -> Image.Image:
    """Photo ``idx`` of generated class ``cls``: a crop of the class's smooth texture."""
    rng = np.random.default_rng(cls)
    gw, gh = w // 6 + 20, h // 6 + 20
    big = Image.fromarray(np.uint8(np.clip(rng.normal(0, 1, (gh, gw, 3)) * 50 + 128, 0, 255)))
    big = big.resize((gw * 6, gh * 6), Image.Resampling.BICUBIC).filter(
        ImageFilter.GaussianBlur(2))
    ox, oy = (idx * 37) % 100, (idx * 23) % 100
    crop = np.asarray(big.crop((ox, oy, ox + w, oy + h)), np.float32)
    r = np.random.default_rng(cls * 100 + idx)
    crop = crop * (0.85 + 0.3 * r.random()) + r.normal(0, 6, crop.shape)
    return Image.fromarray(np.uint8(np.clip(crop, 0, 255)))


def object_photo(cls: int, idx: int, w: int = 192, h: int = 144) -> Image.Image:
    """Photo ``idx`` of generated class ``cls``: the class's textured blob on a background."""
    rng = np.random.default_rng(1000 + cls)
    tex = Image.fromarray(np.uint8(rng.integers(0, 255, (12, 12, 3)))).resize(
        (w, h), Image.Resampling.BICUBIC)
    r = np.random.default_rng(10_000 * cls + idx)
    bg = np.full((h, w, 3), 235, np.float32) - np.linspace(0, 30, w)[None, :, None]
    img = Image.fromarray(np.uint8(bg))
    mask = Image.new("L", (w, h), 0)
    cx, cy = w / 2 + r.uniform(-0.12, 0.12) * w, h / 2 + r.uniform(-0.12, 0.12) * h
    s = r.uniform(0.8, 1.1)
    ImageDraw.Draw(mask).ellipse((cx - 0.3 * w * s, cy - 0.3 * h * s,
                                  cx + 0.3 * w * s, cy + 0.3 * h * s), fill=255)
    img.paste(tex, (0, 0), mask.filter(ImageFilter.GaussianBlur(2)))
    a = np.asarray(img, np.float32) * r.uniform(0.85, 1.1) + r.normal(0, 4, (h, w, 3))
    return Image.fromarray(np.uint8(np.clip(a, 0, 255)))


def resized_copy(src: Path, dst: Path, scale: float, quality: int) -> None:
    with Image.open(src) as im:
        im = im.convert("RGB")
        im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))),
                  Image.Resampling.LANCZOS).save(dst, "JPEG", quality=quality)


def make_images(root: Path, caltech: Path | None
                ) -> tuple[dict[Path, str], dict[Path, Path], dict[Path, Path]]:
    """``({original: class}, {2/3 q60 copy: original}, {1/2 q40 copy: original})``."""
    cls_of: dict[Path, str] = {}
    for c in range(8):
        for i in range(5):
            p = root / f"gen_{c}_{i}.jpg"
            scene(c, i).save(p, quality=90)
            cls_of[p] = f"gen{c}"
            p = root / f"obj_{c}_{i}.jpg"
            object_photo(c, i).save(p, quality=90)
            cls_of[p] = f"obj{c}"
    if caltech is not None:
        with zipfile.ZipFile(caltech) as z:
            names = [n for n in z.namelist() if n.lower().endswith(".jpg")]
            for cname in CALTECH_CLASSES:
                for n in sorted(n for n in names if f"/{cname}/" in n)[:6]:
                    p = root / f"cal_{cname}_{Path(n).name}"
                    p.write_bytes(z.read(n))
                    cls_of[p] = cname
    copies, hard = {}, {}
    for p in sorted(cls_of)[::3]:
        copies[root / f"copy_{p.stem}.jpg"] = p
        resized_copy(p, root / f"copy_{p.stem}.jpg", 2 / 3, 60)
        hard[root / f"half_{p.stem}.jpg"] = p
        resized_copy(p, root / f"half_{p.stem}.jpg", 1 / 2, 40)
    return cls_of, copies, hard


def report(name: str, vec: Callable[[list[Path]], np.ndarray], cls_of: dict[Path, str],
           copies: dict[Path, Path], hard: dict[Path, Path]) -> None:
    paths = sorted([*cls_of, *copies, *hard])
    x = vec(paths)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    sim = x @ x.T
    ix = {p: i for i, p in enumerate(paths)}
    src = {**{p: p for p in cls_of}, **copies, **hard}
    print(f"== {name}")
    for what, cp in (("2/3 q60", copies), ("1/2 q40", hard)):
        for part in ("gen", "obj", "cal"):
            s = [sim[ix[q], ix[p]] for q, p in cp.items() if p.name.startswith(part)]
            if s:
                print(f"  {what} copy vs original ({part}): min {min(s):.4f}, "
                      f"median {np.median(s):.4f} (n={len(s)})")
    for part in ("gen", "obj", "cal"):
        same, diff = [], []
        for a in paths:
            for b in paths:
                if ix[a] < ix[b] and src[a] != src[b] and src[a].name.startswith(part):
                    (same if cls_of[src[a]] == cls_of[src[b]] else diff).append(
                        (float(sim[ix[a], ix[b]]), a.name, b.name))
        if same:
            top = max(same)
            print(f"  different photos, one class ({part}): max {top[0]:.4f} "
                  f"({top[1]} ~ {top[2]}); other classes: max {max(diff)[0]:.4f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--caltech", type=Path, help="caltech101.zip (101_ObjectCategories/...)")
    ap.add_argument("--embeddings", metavar="CHECKPOINT",
                    help="also show a checkpoint's embeddings' cosine similarities")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cls_of, copies, hard = make_images(Path(tmp), args.caltech)

        def pixels(paths: list[Path]) -> np.ndarray:
            sigs = [pixel_signature(p) for p in paths]
            bad = [(p, s) for p, s in zip(paths, sigs, strict=True) if isinstance(s, str)]
            assert not bad, bad
            return np.stack(sigs)  # type: ignore[arg-type]

        print(f"{len(cls_of)} originals, {len(copies)} copies of each kind; "
              f"duplicates' default threshold {DEFAULT_THRESHOLD}")
        report("pixel signature (duplicates)", pixels, cls_of, copies, hard)
        if args.embeddings:
            from fewshot_studio.engine.api import LabelSettings
            from fewshot_studio.engine.session import LabelingSession

            def embeddings(paths: list[Path]) -> np.ndarray:
                with LabelingSession(args.embeddings, LabelSettings(device="cpu"),
                                     cache_path=Path(tmp) / "cache.sqlite") as s:
                    out: list[np.ndarray] = []
                    for _, res in s.embedding.stream(paths):
                        out.extend(np.asarray(r).reshape(-1) for r in res)
                return np.stack(out)

            report(f"{args.embeddings} embeddings (cosine)", embeddings, cls_of, copies, hard)
    return 0


if __name__ == "__main__":
    sys.exit(main())
