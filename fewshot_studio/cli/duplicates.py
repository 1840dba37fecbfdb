"""``fewshot-studio duplicates``: find exact and near-duplicate images in a folder and write
them as a CSV (columns ``group,path,similarity``)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from fewshot_studio.cli import help_texts
from fewshot_studio.errors import UserError
from fewshot_studio.progress import ProgressBar

# engine.duplicates.DEFAULT_THRESHOLD, repeated here so that --help does not import numpy
# (tests/test_cli_help.py checks that the two agree).
DEFAULT_THRESHOLD = 0.985


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``duplicates``."""
    p = subparsers.add_parser(
        "duplicates", help="find exact and near-duplicate images in a folder",
        **help_texts(
            "Find the images under DIR that are exact copies (same bytes) or near copies "
            "(resized, re-encoded: their 32x32 grayscale thumbnails correlate at least "
            "--threshold) of each other, and write one CSV row per image in a group of two or "
            "more: group,path,similarity. Files that are not readable images are compared by "
            "their bytes only. Exit code 0: all went well; 1: finished, but some files or "
            "folders could not be read, or DIR has no images; 2: refused to start (nothing "
            "written).",
            "fewshot-studio duplicates photos/ --out dups.csv",
            "fewshot-studio duplicates photos/ --threshold 0.99 --out dups.csv"))
    p.add_argument("folder", type=Path, metavar="DIR", help="folder of images to search")
    p.add_argument("--out", required=True, type=Path,
                   help="output CSV (an existing file must be one this program wrote)")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD, metavar="T",
                   help="similarity (thumbnail correlation, up to 1) from which two images "
                        f"are near-duplicates (default {DEFAULT_THRESHOLD}; lower finds more)")
    p.add_argument("--cache", type=Path, metavar="PATH",
                   help="cache file of the thumbnails (default: the embedding cache in the "
                        "user cache directory); a second run reads no image")
    p.add_argument("--absolute-paths", action="store_true",
                   help="write absolute paths (default: relative to DIR)")
    p.add_argument("--no-recursive", action="store_true",
                   help="only images directly in DIR, not in its sub-folders")
    p.set_defaults(func=run)


def _list(what: str, items: list[tuple[Path, str]], show: int = 5) -> None:
    for path, reason in items[:show]:
        print(f"{what} {path}: {reason}", file=sys.stderr)
    if len(items) > show:
        print(f"... and {len(items) - show} more", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    """Scan, compare, write the CSV. Exit code: 0 all fine; 1 finished with files or folders
    that could not be read, or no images; 2 (UserError) refused before any work."""
    from fewshot_studio.data.scan import scan_images
    from fewshot_studio.engine import export
    from fewshot_studio.engine.cache import EmbeddingCache
    from fewshot_studio.engine.duplicates import DuplicatesResult, find_duplicates

    if not 0.0 < args.threshold <= 1.0:
        raise UserError(f"--threshold must be in (0, 1], got {args.threshold}")
    images = scan_images(args.folder, recursive=not args.no_recursive)
    export.check_output(args.out, images)
    for folder, reason in images.unreadable:
        print(f"warning: cannot read folder {folder}: {reason}", file=sys.stderr)
    if not images:
        print(f"warning: no images in {args.folder}", file=sys.stderr)
    t0 = time.perf_counter()
    cache = EmbeddingCache(args.cache)
    try:
        result = DuplicatesResult()
        bar = ProgressBar("comparing", unit="img")
        for p in find_duplicates(images, args.threshold, cache):
            bar.update(p, force=p.done == p.total)
            if isinstance(p.payload, DuplicatesResult):
                result = p.payload
        bar.close()
        cache_failures = cache.failures
    finally:
        cache.close()
    rows = [(g, path, sim) for g, group in enumerate(result.groups, 1)
            for path, sim in group.members]
    export.write_duplicates_csv(rows, args.out, args.folder, args.absolute_paths, images)
    _list("skipped", result.skipped)
    if result.bytes_only:
        print(f"note: {len(result.bytes_only)} file(s) are not readable images (or are flat); "
              "compared by their bytes only", file=sys.stderr)
        _list("  ", result.bytes_only, show=3)
    seconds = time.perf_counter() - t0
    parts = [f"{len(result.groups)} groups of duplicates, {len(rows)} images, among "
             f"{len(images)} images in {seconds:.1f} s; wrote {args.out}"]
    if result.skipped:
        parts.append(f"skipped {len(result.skipped)}")
    if images.unreadable:
        parts.append(f"unreadable folders {len(images.unreadable)}")
    if cache_failures:
        parts.append(f"cache failures {cache_failures}")
    print("; ".join(parts))
    sys.stdout.flush()
    return 1 if result.skipped or images.unreadable or not images else 0
