"""Near-duplicate images in a folder (``fewshot-studio duplicates``).

Two images are duplicates when

* their bytes are the same (exact copies: files of one size are hashed with SHA-256; a file
  that does not decode as an image can still be an exact copy of another), or
* their pixel signatures correlate at least ``threshold`` (near copies: resized, re-encoded,
  recompressed). The signature (:func:`pixel_signature`) is the image, EXIF orientation
  applied, in grayscale, squeezed to 32x32 pixels and standardised (zero mean, unit length);
  the similarity of two images is the dot product of their signatures (Pearson correlation of
  the thumbnails). A flat image (one grey level) has no signature: only its bytes compare.

Why not the model's embeddings: they are made to put different photos of one class close
together, which is what a duplicate finder must not do. With the bundled ``natural-protonet``
a 2/3-size JPEG copy at quality 60 scored a cosine similarity as low as 0.64 with its
original, while two different Caltech-101 motorbikes scored 0.92 and two different generated
photos of one class 0.985 (``benchmarks/duplicate_threshold.py``; README, "Near-duplicates").

Signatures go into the SQLite embedding cache (:class:`~.cache.EmbeddingCache`, under the key
:data:`SIGNATURE_ID`, valid while a file's size and mtime are unchanged): a second run over a
folder decodes nothing.

Groups are the connected components of those pairs (single linkage: a chain A~B~C is one
group). A member's ``similarity`` is its highest similarity to another member of its group
(1 for an exact copy). Groups are numbered from 1 in the order of their first path; a group
lists its members by path.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fewshot_studio.engine.cache import (
    EmbeddingCache,
    FileKey,
    file_keys,
    is_cacheable_error,
)
from fewshot_studio.progress import Progress

DEFAULT_THRESHOLD = 0.985
"""Signature correlation at or above which two images are near-duplicates; chosen on data by
``benchmarks/duplicate_threshold.py`` (README, "Near-duplicates")."""
SIGNATURE_SIZE = 32
SIGNATURE_ID = f"pixels:gray{SIGNATURE_SIZE}:v1"
"""The cache key of the signatures (a checkpoint's features use its SHA-256 instead)."""
_HASH_CHUNK = 1 << 20
_BATCH = 256  # files per cache lookup / store
_SIM_BLOCK = 1024  # rows of the similarity matrix computed at a time (bounded memory)


@dataclass(frozen=True)
class DuplicateGroup:
    """Two or more duplicate images: ``members`` = ``((path, similarity), ...)`` by path."""

    members: tuple[tuple[Path, float], ...]


@dataclass
class DuplicatesResult:
    """What :func:`find_duplicates` found: the ``groups``; ``skipped``: ``(path, reason)`` for
    each file compared neither by bytes nor by pixels (it could not be read); ``bytes_only``:
    ``(path, reason)`` for each file compared by bytes only (not a readable image, or flat)."""

    groups: list[DuplicateGroup] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    bytes_only: list[tuple[Path, str]] = field(default_factory=list)


def file_digest(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes (raises OSError)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def exact_copies(paths: Sequence[Path]) -> tuple[list[list[int]], list[tuple[int, str]]]:
    """Indices of ``paths`` with the same bytes: ``(sets of 2 or more, unreadable)``, where
    ``unreadable`` is ``(index, reason)``. Only files that share a size are read (hashed)."""
    by_size: dict[int, list[int]] = {}
    failed: list[tuple[int, str]] = []
    for i, p in enumerate(paths):
        try:
            by_size.setdefault(os.stat(p).st_size, []).append(i)
        except OSError as e:
            failed.append((i, (e.strerror or str(e)).lower()))
    same: list[list[int]] = []
    for idx in by_size.values():
        if len(idx) < 2:
            continue
        by_hash: dict[str, list[int]] = {}
        for i in idx:
            try:
                by_hash.setdefault(file_digest(paths[i]), []).append(i)
            except OSError as e:
                failed.append((i, (e.strerror or str(e)).lower()))
        same.extend(g for g in by_hash.values() if len(g) > 1)
    return same, sorted(failed)


def pixel_signature(path: str | os.PathLike[str]) -> np.ndarray | str:
    """The signature of an image file (see the module): ``(SIGNATURE_SIZE ** 2,)`` float32 of
    unit length, or a one-line reason when it is not a readable image or is flat."""
    from PIL import Image

    from fewshot_studio.data.images import ImageLoadError, load_image

    try:
        img = load_image(os.fspath(path), 1, draft_size=2 * SIGNATURE_SIZE)
    except ImageLoadError as e:
        return str(e) or "unreadable image"
    except Exception as e:  # anything else PIL raised
        return f"unreadable image ({type(e).__name__}: {' '.join(str(e).split())[:160]})"
    with img:
        small = img.resize((SIGNATURE_SIZE, SIGNATURE_SIZE), Image.Resampling.BILINEAR,
                           reducing_gap=2.0)
    a = np.asarray(small, np.float32).ravel()
    a = a - a.mean()
    norm = float(np.linalg.norm(a))
    if norm < 1e-3 * a.size:  # one grey level (up to rounding): nothing to correlate
        return "flat image (one grey level)"
    return a / norm


def signatures(paths: Sequence[Path], cache: EmbeddingCache | None,
               workers: int = 2) -> Iterator[tuple[int, list[np.ndarray | str]]]:
    """Signatures (or reasons) of ``paths`` in order, by batches: yields ``(offset,
    results)``. Cached ones are read from ``cache``; new ones are computed in ``workers``
    threads and stored (file-system errors are not cached)."""
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="fewshot-dups") as pool:
        for start in range(0, len(paths), _BATCH):
            chunk = paths[start:start + _BATCH]
            keys = file_keys(chunk)
            hits = cache.lookup(SIGNATURE_ID, [k for k in keys if k]) if cache else {}
            results: list[np.ndarray | str | None] = []
            todo: list[int] = []
            for j, k in enumerate(keys):
                e = hits.get(k.path) if k else None
                if k is None:
                    results.append("file not found" if not os.path.lexists(chunk[j])
                                   else "cannot read file")
                elif e is not None:
                    results.append(e.feature if e.feature is not None else e.error)
                else:
                    results.append(None)
                    todo.append(j)
            new = list(pool.map(pixel_signature, [chunk[j] for j in todo]))
            rows: list[tuple[FileKey, np.ndarray | None, str]] = []
            for j, r in zip(todo, new, strict=True):
                results[j] = r
                k = keys[j]
                assert k is not None
                if not isinstance(r, str):
                    rows.append((k, r, ""))
                elif is_cacheable_error(r):
                    rows.append((k, None, r))
            if cache and rows:
                cache.store(SIGNATURE_ID, rows)
            yield start, [r if r is not None else "not computed" for r in results]


def similar_pairs(unit: np.ndarray, threshold: float,
                  block: int = _SIM_BLOCK) -> Iterator[tuple[int, int, float]]:
    """``(i, j, similarity)`` with ``i < j`` for every pair of rows of ``unit`` (unit-length
    vectors) whose dot product is at least ``threshold``; ``block`` rows at a time."""
    n = len(unit)
    for start in range(0, n, block):
        sims = unit[start:start + block] @ unit.T
        rows, cols = np.nonzero(sims >= threshold)
        for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
            if c > start + r:
                yield start + r, c, float(sims[r, c])


def group_pairs(n: int, pairs: Iterable[tuple[int, int, float]]) -> list[list[tuple[int, float]]]:
    """Connected components (of 2 or more) of ``n`` items linked by ``(i, j, similarity)``
    pairs: ``[[(index, best similarity to another member), ...], ...]``, each sorted by
    index, the groups by their first index."""
    parent = list(range(n))
    best: dict[int, float] = {}

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j, s in pairs:
        s = min(1.0, s)
        best[i], best[j] = max(best.get(i, s), s), max(best.get(j, s), s)
        ri, rj = root(i), root(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    comps: dict[int, list[tuple[int, float]]] = {}
    for i in sorted(best):
        comps.setdefault(root(i), []).append((i, best[i]))
    return sorted((c for c in comps.values() if len(c) > 1), key=lambda c: c[0][0])


def group_duplicates(paths: Sequence[Path], sigs: Sequence[np.ndarray | str],
                     threshold: float = DEFAULT_THRESHOLD) -> DuplicatesResult:
    """Group ``paths`` (sorted, with their signatures or reasons ``sigs``): exact copies by
    bytes, near copies by signature (see the module)."""
    result = DuplicatesResult()
    same, failed = exact_copies(paths)
    bad = dict(failed)
    result.skipped = [(paths[i], r) for i, r in failed]
    pairs: list[tuple[int, int, float]] = [(g[0], j, 1.0) for g in same for j in g[1:]]
    have = [i for i, s in enumerate(sigs) if i not in bad and not isinstance(s, str)]
    result.bytes_only = [(paths[i], s) for i, s in enumerate(sigs)
                         if i not in bad and isinstance(s, str)]
    if have:
        unit = np.stack([np.asarray(sigs[i], np.float32) for i in have])
        pairs.extend((have[a], have[b], s) for a, b, s in similar_pairs(unit, threshold))
    for comp in group_pairs(len(paths), pairs):
        result.groups.append(DuplicateGroup(tuple((paths[i], s) for i, s in comp)))
    return result


def find_duplicates(paths: Sequence[Path], threshold: float = DEFAULT_THRESHOLD,
                    cache: EmbeddingCache | None = None,
                    workers: int = 2) -> Iterator[Progress]:
    """Signatures of ``paths`` (through ``cache``), then groups (:func:`group_duplicates`).
    Yields a Progress per batch; the last one's ``payload`` is the :class:`DuplicatesResult`.
    ``gen.close()`` cancels."""
    paths = sorted({Path(os.path.abspath(p)) for p in paths})
    total = len(paths)
    sigs: list[np.ndarray | str] = []
    yield Progress(0, total, "reading")
    for start, results in signatures(paths, cache, workers):
        sigs.extend(results)
        yield Progress(start + len(results), total, "reading")
    result = group_duplicates(paths, sigs, threshold)
    yield Progress(total, total, "grouped", {"groups": len(result.groups)}, result)
