"""Class-folder datasets (a folder or a .zip read in place), the Omniglot Vinyals splits, and
an in-memory uint8 store for fast episodic training.

Layouts: ``root/<class>/<image>`` or nested ``root/<alphabet>/<character>/<image>``: every
folder that directly holds images is a class, named by its path relative to the dataset root
(posix, e.g. ``"Angelic/character01"``). Inside a zip a single top folder (e.g.
``images_background/``) is stripped. Hidden files and folders (and ``__MACOSX``) are skipped;
files without an image extension are ignored.

Data location: functions that need the shared data take a ``data_dir``; when it is None they use
the environment variable ``FEWSHOT_DATA`` and else ``<repo>/../shared/data``
(:func:`default_data_dir`). The Omniglot files are ``<data_dir>/omniglot/images_background.zip``,
``images_evaluation.zip`` and ``splits/vinyals_{train,val,trainval,test}.txt``.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from PIL import Image

from fewshot_studio.data.images import (
    IMAGE_EXTENSIONS,
    ImageLoadError,
    draft_size_for,
    load_image,
    preprocess_uint8,
)
from fewshot_studio.data.preprocess import Preprocess
from fewshot_studio.errors import UserError
from fewshot_studio.progress import Progress

log = logging.getLogger(__name__)

ROTATION_SUFFIX = "rot"
"""Rotation classes are named ``"<class>/rot090"`` (degrees, 3 digits), as in the Vinyals splits."""


# --------------------------------------------------------------------------------------------
# locations and splits


def default_data_dir() -> Path:
    """``$FEWSHOT_DATA`` if set, else ``<repo>/../shared/data``."""
    env = os.environ.get("FEWSHOT_DATA")
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[3] / "shared" / "data"


def omniglot_dir(data_dir: str | Path | None = None) -> Path:
    return Path(data_dir).expanduser() / "omniglot" if data_dir else default_data_dir() / "omniglot"


def load_split(name: str, splits_dir: str | Path | None = None) -> list[str]:
    """Class names of a Vinyals split, e.g. ``"Angelic/character01/rot000"``.

    ``name``: ``train``, ``val``, ``trainval``, ``test`` (or ``vinyals_train`` ...), or a path to
    a text file with one class per line. ``splits_dir`` defaults to
    ``<default_data_dir()>/omniglot/splits``. Raises :class:`UserError` if the file is missing.
    """
    p = Path(name).expanduser()
    if not (p.suffix == ".txt" and p.is_file()):
        stem = name if name.startswith("vinyals_") else f"vinyals_{name}"
        d = Path(splits_dir).expanduser() if splits_dir else omniglot_dir() / "splits"
        p = d / f"{stem}.txt"
    if not p.is_file():
        raise UserError(f"split file not found: {p}")
    lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


def split_rotation(name: str) -> tuple[str, int | None]:
    """``"A/char01/rot090"`` -> ``("A/char01", 90)``; without the suffix -> ``(name, None)``."""
    base, _, last = name.rpartition("/")
    if base and last.startswith(ROTATION_SUFFIX) and last[len(ROTATION_SUFFIX) :].isdigit():
        return base, int(last[len(ROTATION_SUFFIX) :])
    return name, None


def rotation_class_name(name: str, degrees: int) -> str:
    return f"{name}/{ROTATION_SUFFIX}{degrees:03d}"


def split_classes(
    class_names: Sequence[str], n_holdout: int, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Hold out ``n_holdout`` base classes (all rotation variants of a class go together):
    returns ``(kept, held_out)`` class names, each in the input order. Deterministic for a seed."""
    groups: dict[str, list[str]] = {}
    for n in class_names:
        groups.setdefault(split_rotation(n)[0], []).append(n)
    bases = list(groups)
    if not 0 <= n_holdout <= len(bases):
        raise UserError(f"cannot hold out {n_holdout} of {len(bases)} classes")
    pick = np.random.default_rng(seed).permutation(len(bases))[:n_holdout]
    held = {bases[i] for i in pick}
    kept = [n for n in class_names if split_rotation(n)[0] not in held]
    out = [n for n in class_names if split_rotation(n)[0] in held]
    return kept, out


# --------------------------------------------------------------------------------------------
# class-folder datasets


def _hidden(parts: Sequence[str]) -> bool:
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


class ClassFolderDataset:
    """A class-folder dataset in a folder or a .zip read in place (see the module docstring).

    ``classes`` selects and orders classes (default: all, sorted); a name that does not exist
    raises :class:`UserError`. Classes with fewer than ``min_images`` images are left out
    (listed in ``excluded_classes``, with a warning).

    Attributes: ``root`` (Path), ``is_zip``, ``class_names`` (list[str]), ``samples``
    (list[(member, class index)]: member = path inside the zip, or relative to the folder,
    posix), ``targets`` (int64 ndarray (N,)), ``excluded_classes``.
    """

    def __init__(
        self,
        root: str | Path,
        classes: Sequence[str] | None = None,
        min_images: int = 1,
    ) -> None:
        self.root = Path(root).expanduser()
        if not self.root.exists():
            raise UserError(f"dataset not found: {self.root}")
        self.is_zip = self.root.is_file()
        self._local = threading.local()
        if self.is_zip:
            if not zipfile.is_zipfile(self.root):
                raise UserError(f"not a folder or a .zip file: {self.root}")
            self._all = self._scan_zip()
        else:
            self._all = self._scan_folder()
        if not self._all:
            raise UserError(f"no class folders with images found in {self.root}")
        self._select(classes, min_images)

    # -- scanning

    def _scan_zip(self) -> dict[str, list[str]]:
        try:
            with zipfile.ZipFile(self.root) as z:
                names = [i.filename for i in z.infolist() if not i.is_dir()]
        except (zipfile.BadZipFile, OSError) as e:
            raise UserError(f"cannot read zip {self.root}: {e}") from None
        files = []
        for n in names:
            parts = PurePosixPath(n).parts
            if not parts or _hidden(parts) or not _is_image_name(parts[-1]):
                continue
            files.append((n, parts))
        # strip one common top folder if it holds no images directly
        tops = {parts[0] for _, parts in files}
        strip = len(tops) == 1 and all(len(parts) > 2 for _, parts in files)
        by_class: dict[str, list[str]] = {}
        for n, parts in files:
            rel = parts[1:] if strip else parts
            if len(rel) < 2:
                continue  # an image at the dataset root belongs to no class
            by_class.setdefault("/".join(rel[:-1]), []).append(n)
        return {c: sorted(m) for c, m in sorted(by_class.items())}

    def _scan_folder(self) -> dict[str, list[str]]:
        by_class: dict[str, list[str]] = {}
        for dirpath, dirnames, filenames in os.walk(self.root, onerror=None):
            dirnames[:] = sorted(d for d in dirnames if not _hidden([d]))
            rel = Path(dirpath).relative_to(self.root).as_posix()
            if rel == ".":
                continue
            imgs = sorted(f for f in filenames if not f.startswith(".") and _is_image_name(f))
            if imgs:
                by_class[rel] = [f"{rel}/{f}" for f in imgs]
        return dict(sorted(by_class.items()))

    def _select(self, classes: Sequence[str] | None, min_images: int) -> None:
        if classes is None:
            names = list(self._all)
        else:
            names = list(dict.fromkeys(classes))
            missing = [c for c in names if c not in self._all]
            if missing:
                shown = ", ".join(repr(c) for c in missing[:5])
                more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
                raise UserError(f"class {shown}{more} not found in {self.root}")
        self.excluded_classes = [c for c in names if len(self._all[c]) < min_images]
        if self.excluded_classes:
            warnings.warn(
                f"{self.root}: skipping {len(self.excluded_classes)} class(es) with fewer than "
                f"{min_images} images: {', '.join(self.excluded_classes[:10])}",
                stacklevel=3,
            )
        self.class_names = [c for c in names if len(self._all[c]) >= min_images]
        self.samples: list[tuple[str, int]] = [
            (m, ci) for ci, c in enumerate(self.class_names) for m in self._all[c]
        ]
        self.targets = np.fromiter((ci for _, ci in self.samples), np.int64, len(self.samples))

    def select(self, classes: Sequence[str], min_images: int = 1) -> ClassFolderDataset:
        """A view of this dataset with only ``classes`` (in that order), no re-scan."""
        new = object.__new__(type(self))
        new.root, new.is_zip, new._all = self.root, self.is_zip, self._all
        new._local = threading.local()
        new._select(classes, min_images)
        return new

    def all_class_names(self) -> list[str]:
        """Every class found, selected or not."""
        return list(self._all)

    # -- reading

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        return (
            f"ClassFolderDataset({str(self.root)!r}, {len(self.class_names)} classes, "
            f"{len(self)} images)"
        )

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_local", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    def _zip(self) -> zipfile.ZipFile:
        """One ZipFile handle per thread (and per process, so fork is safe)."""
        z = getattr(self._local, "zip", None)
        if z is None or self._local.pid != os.getpid():
            z = zipfile.ZipFile(self.root)
            self._local.zip, self._local.pid = z, os.getpid()
        return z

    def display_path(self, member: str) -> str:
        """A path for messages: ``<root>/<member>`` (for a zip, the member inside the zip)."""
        return f"{self.root.as_posix()}/{member}"

    def read_bytes(self, member: str) -> bytes:
        """The raw bytes of a member (OSError / KeyError / zipfile.BadZipFile on failure)."""
        if self.is_zip:
            return self._zip().read(member)
        return (self.root / member).read_bytes()

    def load(
        self,
        member: str,
        channels: int,
        draft_size: int | None = None,
        max_pixels: int | None = None,
    ) -> Image.Image:
        """Decode one member (see :func:`~fewshot_studio.data.images.load_image`).
        Raises :class:`ImageLoadError` for anything unreadable, including zip errors."""
        if not self.is_zip:
            return load_image(self.root / member, channels, draft_size, max_pixels)
        try:
            data = self.read_bytes(member)
        except KeyError:
            raise ImageLoadError("file not found") from None
        except (zipfile.BadZipFile, zlib.error, EOFError) as e:
            raise ImageLoadError(f"corrupt zip member ({e})") from None
        except OSError as e:
            raise ImageLoadError(f"cannot read file ({e.strerror or e})") from None
        return load_image(data, channels, draft_size, max_pixels)


class ConcatClassFolderDataset:
    """Several class-folder datasets as one (e.g. both Omniglot zips for the Vinyals splits).
    Same interface as :class:`ClassFolderDataset`; members are ``"<part root name>/<member>"``.
    Class names must be unique across the parts."""

    def __init__(
        self,
        roots: Sequence[str | Path | ClassFolderDataset],
        classes: Sequence[str] | None = None,
        min_images: int = 1,
    ) -> None:
        parts = [r if isinstance(r, ClassFolderDataset) else ClassFolderDataset(r) for r in roots]
        owner: dict[str, int] = {}
        for i, p in enumerate(parts):
            for c in p.all_class_names() if classes is not None else p.class_names:
                if c in owner:
                    raise UserError(f"class {c!r} is in both {parts[owner[c]].root} and {p.root}")
                owner[c] = i
        if classes is not None:
            wanted = list(dict.fromkeys(classes))
            missing = [c for c in wanted if c not in owner]
            if missing:
                shown = ", ".join(repr(c) for c in missing[:5])
                more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
                roots_s = ", ".join(str(p.root) for p in parts)
                raise UserError(f"class {shown}{more} not found in {roots_s}")
            parts = [
                p.select([c for c in wanted if owner[c] == i], min_images)
                for i, p in enumerate(parts)
            ]
            order = wanted
        else:
            order = [c for p in parts for c in p.class_names]
        self.parts = parts
        self.root = parts[0].root.parent if parts else Path(".")
        self.excluded_classes = [c for p in parts for c in p.excluded_classes]
        names = [p.root.name for p in parts]
        self._prefixes = (
            names if len(set(names)) == len(names) else [f"{i}:{n}" for i, n in enumerate(names)]
        )
        self._route = {pre: p for pre, p in zip(self._prefixes, parts, strict=True)}
        present = {c for p in parts for c in p.class_names}
        self.class_names = [c for c in order if c in present]
        index = {c: k for k, c in enumerate(self.class_names)}
        self.samples = []
        for pre, p in zip(self._prefixes, parts, strict=True):
            for m, ci in p.samples:
                self.samples.append((f"{pre}/{m}", index[p.class_names[ci]]))
        self.samples.sort(key=lambda s: s[1])  # class order, members sorted within a class
        self.targets = np.fromiter((ci for _, ci in self.samples), np.int64, len(self.samples))

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        return (
            f"ConcatClassFolderDataset({[str(p.root) for p in self.parts]}, "
            f"{len(self.class_names)} classes, {len(self)} images)"
        )

    def _split(self, member: str) -> tuple[ClassFolderDataset, str]:
        pre, _, rest = member.partition("/")
        return self._route[pre], rest

    def display_path(self, member: str) -> str:
        p, m = self._split(member)
        return p.display_path(m)

    def read_bytes(self, member: str) -> bytes:
        p, m = self._split(member)
        return p.read_bytes(m)

    def load(
        self,
        member: str,
        channels: int,
        draft_size: int | None = None,
        max_pixels: int | None = None,
    ) -> Image.Image:
        p, m = self._split(member)
        return p.load(m, channels, draft_size, max_pixels)


AnyClassDataset = ClassFolderDataset | ConcatClassFolderDataset


def open_dataset(
    root: str | Path | Sequence[str | Path],
    classes: Sequence[str] | None = None,
    min_images: int = 1,
) -> AnyClassDataset:
    """A folder / zip, or a list of them (concatenated)."""
    if isinstance(root, (str, os.PathLike)):
        return ClassFolderDataset(root, classes, min_images)
    return ConcatClassFolderDataset(list(root), classes, min_images)


# --------------------------------------------------------------------------------------------
# in-memory store


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
    (path, reason) for files that could not be read.
    """

    images: torch.Tensor
    targets: torch.Tensor
    class_names: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)

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
        )

    def subset_classes(self, names: Sequence[str]) -> InMemoryImages:
        """Only the classes ``names``, renumbered in that order (images keep their order).
        Raises :class:`UserError` for a name that is not here."""
        index = {c: i for i, c in enumerate(self.class_names)}
        missing = [c for c in names if c not in index]
        if missing:
            shown = ", ".join(repr(c) for c in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise UserError(f"class {shown}{more} not in the loaded data")
        lut = torch.full((len(self.class_names),), -1, dtype=torch.int64)
        lut[torch.tensor([index[c] for c in names], dtype=torch.int64)] = torch.arange(len(names))
        lut = lut.to(self.targets.device)
        new_t = lut[self.targets]
        keep = torch.nonzero(new_t >= 0).squeeze(1)
        return InMemoryImages(self.images[keep], new_t[keep], list(names), list(self.skipped))

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
    if rots == [0]:
        mem = InMemoryImages(images, base_t, list(dataset.class_names), skipped)
    else:
        r = len(rots)
        imgs = [images if k == 0 else torch.rot90(images, k // 90, dims=(2, 3)) for k in rots]
        tgts = [base_t * r + j for j in range(r)]
        names = [rotation_class_name(cn, k) for cn in dataset.class_names for k in rots]
        mem = InMemoryImages(torch.cat(imgs), torch.cat(tgts), names, skipped)
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


# --------------------------------------------------------------------------------------------
# Omniglot

OMNIGLOT_PRE = Preprocess(image_size=28, channels=1, mean=(0.0,), std=(1.0,), resize="squash")


def omniglot_dataset(
    which: str = "background", data_dir: str | Path | None = None
) -> ClassFolderDataset:
    """``images_background`` (964 classes) or ``images_evaluation`` (659) zip, read in place."""
    if which not in ("background", "evaluation"):
        raise ValueError("which must be 'background' or 'evaluation'")
    return ClassFolderDataset(omniglot_dir(data_dir) / f"images_{which}.zip")


def omniglot_vinyals(
    split: str,
    data_dir: str | Path | None = None,
    pre: Preprocess = OMNIGLOT_PRE,
    size: int | None = None,
    num_workers: int = 2,
    progress: Callable[[Progress], None] | None = None,
) -> InMemoryImages:
    """A Vinyals split (``train``, ``val``, ``trainval``, ``test``, or a split file) of Omniglot
    as :class:`InMemoryImages`, with the split's rotation classes (``"Angelic/character01/rot090"``)
    in the split file's order. Classes come from both zips, read in place."""
    d = omniglot_dir(data_dir)
    names = load_split(split, d / "splits")
    bases: dict[str, None] = {}
    rots: dict[int, None] = {}
    for n in names:
        base, rot = split_rotation(n)
        bases[base] = None
        rots[0 if rot is None else rot] = None
    ds = ConcatClassFolderDataset(
        [d / "images_background.zip", d / "images_evaluation.zip"], classes=list(bases)
    )
    has_suffix = any(split_rotation(n)[1] is not None for n in names)
    rotations = sorted(rots) if has_suffix else [0]
    if has_suffix and rotations == [0]:
        rotations = [0, 90]  # force suffixed names; the extra rotation is dropped below
    mem = preload(ds, pre, rotations, size, num_workers, progress)
    return mem.subset_classes(names)
