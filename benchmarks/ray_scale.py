"""``label --ray local`` beside a local run on N generated images (default 50,000).

The images: 64 px grayscale glyphs (random strokes), half PNG, half JPEG; 1,000 distinct
files hard-linked to N paths in folders of 1,000 (every path is decoded and embedded; the
cache is keyed by path), plus 10 truncated files (error rows). Support: 5 classes of 5
glyphs. Checkpoint: the bundled ``omniglot-protonet`` (Conv4, 28 px, 64-d features), or
``--checkpoint``.

Each run is a child process (the driver): wall time of the whole command (model load, Ray
start-up and all), images/s as the command reports it, and the driver's peak RSS (VmHWM of
that process; Ray's own processes are not counted). The local run uses a fresh embedding
cache (it writes every feature); the Ray run uses none on its workers (the default of
``--ray``). The two outputs are compared: same labels, largest confidence difference.

    python benchmarks/ray_scale.py [--n 50000] [--root /tmp/fewshot-ray-bench] [--skip-local]
    python benchmarks/ray_scale.py --driver-only   # the driver's head + CSV rows/s
    python benchmarks/ray_scale.py --n 2000 --checkpoint natural-protonet  # a photo model
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT = "omniglot-protonet"
UNIQUE = 1000
PER_FOLDER = 1000


def glyph(rng: np.random.Generator, strokes: np.ndarray | None = None) -> Image.Image:
    """A 64 px white glyph of 3-5 random strokes on black (or ``strokes`` jittered)."""
    if strokes is None:
        strokes = rng.uniform(8, 56, (int(rng.integers(3, 6)), 4))
    img = Image.new("L", (64, 64), 0)
    d = ImageDraw.Draw(img)
    for x0, y0, x1, y1 in strokes + rng.normal(0, 2, strokes.shape):
        d.line((x0, y0, x1, y1), fill=255, width=4)
    return img


def make_data(root: Path, n: int) -> tuple[Path, Path]:
    """``root/support`` (5 classes x 5) and ``root/query`` (n images + 10 truncated)."""
    support, query = root / "support", root / "query"
    if (root / f"done-{n}").exists():
        return support, query
    rng = np.random.default_rng(0)
    shapes = [rng.uniform(8, 56, (4, 4)) for _ in range(5)]
    for c, s in enumerate(shapes):
        (support / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(5):
            glyph(rng, s).save(support / f"class{c}" / f"{i}.png")
    unique = root / "unique"
    unique.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(UNIQUE):
        f = unique / (f"{i:04d}.png" if i % 2 else f"{i:04d}.jpg")
        glyph(rng, shapes[i % 5] if i % 3 else None).save(f)
        files.append(f)
    for i in range(n):
        folder = query / f"f{i // PER_FOLDER:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        src = files[i % UNIQUE]
        dst = folder / f"{i:06d}{src.suffix}"
        if not dst.exists():
            os.link(src, dst)
    for i in range(10):
        (query / f"bad{i}.jpg").write_bytes(files[0].read_bytes()[:200])
    (root / f"done-{n}").write_text("")
    return support, query


def child(argv: list[str]) -> int:
    """Run the CLI here, then print this process's peak RSS (VmHWM: heap and mapped
    libraries), its heap's peak (RssAnon sampled every 0.2 s) and its heap at the end as the
    last stderr line."""
    sys.path.insert(0, str(ROOT))
    from fewshot_studio.cli import main

    def mb(field: str) -> float:
        m = re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text())
        return round(int(m.group(1)) / 1024, 1) if m else 0.0

    peak_anon = [0.0]
    stop = threading.Event()

    def sample() -> None:  # the heap's own peak: VmHWM also counts mapped libraries
        while not stop.wait(0.2):
            peak_anon[0] = max(peak_anon[0], mb("RssAnon"))

    threading.Thread(target=sample, daemon=True).start()
    t0 = time.perf_counter()
    rc = main(argv)
    seconds = time.perf_counter() - t0
    stop.set()
    print(json.dumps({"rc": rc, "seconds": seconds, "peak_rss_mb": mb("VmHWM"),
                      "peak_anon_mb": peak_anon[0], "end_anon_mb": mb("RssAnon")}),
          file=sys.stderr)
    return rc


def run(name: str, argv: list[str]) -> dict:
    """One labeled run in a child process: its summary line's images/s, wall time, RSS."""
    p = subprocess.run([sys.executable, __file__, "--child", "--", *argv], cwd=ROOT,
                       capture_output=True, text=True, check=False)
    stats = json.loads(p.stderr.strip().splitlines()[-1])
    line = next((s for s in p.stdout.splitlines() if s.startswith("labeled ")), p.stdout)
    rate = re.search(r"\(([\d.]+) images/s\)", line)
    stats.update(name=name, images_per_s=float(rate.group(1)) if rate else None, summary=line)
    print(json.dumps(stats), flush=True)
    return stats


def compare(a: Path, b: Path) -> str:
    """Same rows and labels? The largest confidence difference."""
    with open(a, encoding="utf-8") as fa, open(b, encoding="utf-8") as fb:
        ra, rb = list(csv.DictReader(fa)), list(csv.DictReader(fb))
    same = [r["path"] for r in ra] == [r["path"] for r in rb] and all(
        (x["label"], x["status"], x["error"]) == (y["label"], y["status"], y["error"])
        for x, y in zip(ra, rb, strict=True))
    diff = max((abs(float(x["confidence"]) - float(y["confidence"]))
                for x, y in zip(ra, rb, strict=True) if x["confidence"] and y["confidence"]),
               default=0.0)
    return f"{len(ra)} rows; same paths, labels, statuses, errors: {same}; max |d conf| {diff:g}"


def driver_rate(support: Path, rows: int = 200_000, batch: int = 1024) -> str:
    """The driver's own ceiling: rows/s of the head (``LabelingSession.predict_features``)
    and the CSV sink on random 64-d features, one batch of ``batch`` rows at a time (no
    Ray)."""
    sys.path.insert(0, str(ROOT))
    import tempfile

    from fewshot_studio.cli.label import support_classes
    from fewshot_studio.cluster import hooks
    from fewshot_studio.engine.export import csv_sink
    from fewshot_studio.engine.session import LabelingSession

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp, LabelingSession(
            CHECKPOINT, cache_path=Path(tmp) / "c.sqlite") as s:
        s.set_support(support_classes(support))
        shape = hooks.fit_head(s)
        root = Path(tmp) / "q"
        t0 = time.perf_counter()
        with csv_sink(Path(tmp) / "out.csv", root) as add:
            for start in range(0, rows, batch):
                paths = [root / f"{i:08d}.png" for i in range(start, start + batch)]
                feats = rng.normal(0, 1, (batch, *shape)).astype(np.float32)
                add(s.predict_features(paths, list(feats)))
        seconds = time.perf_counter() - t0
    return f"driver head + CSV: {rows / seconds:,.0f} rows/s ({rows} rows, batches of {batch})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--root", type=Path, default=Path("/tmp/fewshot-ray-bench"))
    ap.add_argument("--skip-local", action="store_true")
    ap.add_argument("--checkpoint", default=CHECKPOINT,
                    help=f"a bundled checkpoint or a file (default {CHECKPOINT}; "
                         "natural-protonet: EfficientNet-Lite0 at 224 px)")
    ap.add_argument("--driver-only", action="store_true",
                    help="only the driver's head + CSV rate (no Ray)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    support, query = make_data(args.root, args.n)
    if args.driver_only:
        print(driver_rate(support))
        return 0
    print(f"data: {args.n} images under {query} ({time.perf_counter() - t0:.0f} s)")
    common = ["label", "--checkpoint", args.checkpoint, "--support", str(support),
              "--query", str(query)]
    ray_out = args.root / "ray.csv"
    run("ray local", [*common, "--out", str(ray_out), "--ray", "local"])
    if not args.skip_local:
        cache = args.root / "local-cache.sqlite"
        cache.unlink(missing_ok=True)
        run("local", [*common, "--out", str(args.root / "local.csv"), "--cache", str(cache)])
        print(compare(ray_out, args.root / "local.csv"))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        sys.exit(child(sys.argv[3:]))
    sys.exit(main())
