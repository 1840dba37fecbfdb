"""An in-memory uint8 store of decoded images for fast episodic training, and the threaded
preloading that fills it from a class-folder dataset (with optional rotation classes)."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fewshot_studio.data.class_folders import AnyClassDataset, some_names
from fewshot_studio.data.images import ImageLoadError, draft_size_for, preprocess_uint8
from fewshot_studio.data.preprocess import Preprocess
from fewshot_studio.data.splits import rotation_class_name
from fewshot_studio.errors import UserError
from fewshot_studio.progress import Progress

log = logging.getLogger(__name__)


def normalize_batch(x: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """uint8 (B, C, H, W) (any device) -> float32 ``(x / 255 - mean) / std``."""
    c = x.shape[-3]
    mean = torch.as_tensor(pre.mean, dtype=torch.float32, device=x.device)
    std = torch.as_tensor(pre.std, dtype=torch.float32, device=x.device)
    mean = mean.expand(c) if mean.numel() == 1 else mean
    std = std.expand(c) if std.numel() == 1 else std
    scale = (1.0 / (255.0 * std)).view(c, 1, 1)
    shift = (mean / std).view(c, 1, 1)
    return x.to(torch.float32) * scale - shift


@dataclass
class InMemoryImages:
    """Decoded, resized images held as uint8 (pre-normalisation), on any device.

    images: uint8 (N, C, H, W); targets: int64 (N,) indexes ``class_names``; skipped:
    (path, reason) for files that could not be read; files: the file each image came from
    (N,) (member path inside its dataset; empty when unknown), e.g. for the drawer of an
    Omniglot image (:func:`~fewshot_studio.data.splits.drawer_of`).
    """

    images: torch.Tensor
    targets: torch.Tensor
    class_names: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def device(self) -> torch.device:
        return self.images.device

    def to(self, device: str | torch.device, non_blocking: bool = False) -> InMemoryImages:
        return InMemoryImages(
            self.images.to(device, non_blocking=non_blocking),
            self.targets.to(device, non_blocking=non_blocking),
            list(self.class_names),
            list(self.skipped),
            list(self.files),
        )

    def subset_classes(self, names: Sequence[str]) -> InMemoryImages:
        """Only the classes ``names``, renumbered in that order (images keep their order).
        Raises :class:`UserError` for a name that is not here."""
        index = {c: i for i, c in enumerate(self.class_names)}
        missing = [c for c in names if c not in index]
        if missing:
            raise UserError(f"class {some_names(missing)} not in the loaded data")
        lut = torch.full((len(self.class_names),), -1, dtype=torch.int64)
        lut[torch.tensor([index[c] for c in names], dtype=torch.int64)] = torch.arange(len(names))
        lut = lut.to(self.targets.device)
        new_t = lut[self.targets]
        keep = torch.nonzero(new_t >= 0).squeeze(1)
        files = [self.files[i] for i in keep.tolist()] if self.files else []
        return InMemoryImages(self.images[keep], new_t[keep], list(names), list(self.skipped),
                              files)

    @staticmethod
    def normalize(x_uint8: torch.Tensor, pre: Preprocess) -> torch.Tensor:
        """uint8 (B, C, H, W) -> float (B, C, H, W) normalised by ``pre`` (on x's device)."""
        return normalize_batch(x_uint8, pre)

    def batch(self, indices: torch.Tensor, pre: Preprocess) -> torch.Tensor:
        """Normalised float images (B, C, H, W) at ``indices`` (e.g. an Episode's support)."""
        return normalize_batch(self.images[indices.to(self.images.device)], pre)

    def sampler(self, n_way: int, n_shot: int, n_query: int, seed: int = 0) -> Any:
        """An :class:`~fewshot_studio.data.sampler.EpisodeSampler` over these images."""
        from fewshot_studio.data.sampler import EpisodeSampler

        return EpisodeSampler(
            self.targets, n_way, n_shot, n_query, seed=seed, class_names=self.class_names
        )


def _check_rotations(rotations: Sequence[int]) -> list[int]:
    rots = [int(r) % 360 for r in rotations]
    if not rots or any(r % 90 for r in rots) or len(set(rots)) != len(rots):
        raise ValueError(f"rotations must be distinct multiples of 90 degrees, got {rotations}")
    return rots


def preload_steps(
    dataset: AnyClassDataset,
    pre: Preprocess,
    rotations: Sequence[int] = (0,),
    size: int | None = None,
    num_workers: int = 2,
    chunk: int = 256,
    max_pixels: int | None = None,
) -> Iterator[Progress]:
    """Generator form of :func:`preload`: yields :class:`Progress` while decoding; the last
    step's ``payload`` is the :class:`InMemoryImages`. Closing it cancels the work."""
    rots = _check_rotations(rotations)
    s = size or pre.image_size
    n, c = len(dataset), pre.channels
    out = np.zeros((n, c, s, s), dtype=np.uint8)
    ok = np.zeros(n, dtype=bool)
    errors: dict[int, str] = {}
    draft = draft_size_for(pre, s)
    samples = dataset.samples

    def work(lo: int, hi: int) -> int:
        for i in range(lo, hi):
            try:
                img = dataset.load(samples[i][0], c, draft, max_pixels)
                out[i] = preprocess_uint8(img, pre, s)
                ok[i] = True
            except ImageLoadError as e:
                errors[i] = str(e)
        return hi - lo

    done = 0
    total = n
    yield Progress(0, total, "loading images")
    bounds = [(lo, min(lo + chunk, n)) for lo in range(0, n, chunk)]
    with ThreadPoolExecutor(max(1, num_workers), thread_name_prefix="preload") as pool:
        pending = {pool.submit(work, lo, hi) for lo, hi in bounds}
        try:
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in finished:
                    done += f.result()
                yield Progress(done, total, "loading images")
        finally:
            for f in pending:
                f.cancel()

    keep = np.flatnonzero(ok)
    skipped = [(dataset.display_path(samples[i][0]), errors[i]) for i in sorted(errors)]
    if skipped:
        shown = "; ".join(f"{p}: {r}" for p, r in skipped[:20])
        more = f" (and {len(skipped) - 20} more)" if len(skipped) > 20 else ""
        msg = f"skipped {len(skipped)} unreadable file(s): {shown}{more}"
        warnings.warn(msg, stacklevel=2)
        log.warning(msg)
    images = torch.from_numpy(out[keep]) if keep.size < n else torch.from_numpy(out)
    base_t = torch.from_numpy(dataset.targets[keep])
    files = [samples[i][0] for i in keep.tolist()]
    if rots == [0]:
        mem = InMemoryImages(images, base_t, list(dataset.class_names), skipped, files)
    else:
        r = len(rots)
        imgs = [images if k == 0 else torch.rot90(images, k // 90, dims=(2, 3)) for k in rots]
        tgts = [base_t * r + j for j in range(r)]
        names = [rotation_class_name(cn, k) for cn in dataset.class_names for k in rots]
        mem = InMemoryImages(torch.cat(imgs), torch.cat(tgts), names, skipped, files * r)
    yield Progress(total, total, "loaded", payload=mem)


def preload(
    dataset: AnyClassDataset,
    pre: Preprocess,
    rotations: Sequence[int] = (0,),
    size: int | None = None,
    num_workers: int = 2,
    progress: Callable[[Progress], None] | None = None,
    max_pixels: int | None = None,
) -> InMemoryImages:
    """Decode every image of ``dataset`` with a thread pool into uint8 (N, C, s, s) at
    ``s = size or pre.image_size`` (resized as ``pre.resize`` says, not normalised).

    ``rotations`` (degrees, multiples of 90): each class becomes one class per rotation, named
    ``"<class>/rot090"`` (all suffixed, rot000 included, when more than ``(0,)`` is asked for);
    class id = base id * len(rotations) + rotation index. Unreadable files are skipped, listed
    in ``.skipped`` and warned about. ``progress`` is called with each :class:`Progress`.
    """
    mem = None
    for step in preload_steps(dataset, pre, rotations, size, num_workers, max_pixels=max_pixels):
        if progress is not None:
            progress(step)
        if step.payload is not None:
            mem = step.payload
    assert mem is not None
    return mem
