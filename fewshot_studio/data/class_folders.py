"""Class-folder datasets: a folder or a .zip read in place, or several of them as one.

Layouts: ``root/<class>/<image>`` or nested ``root/<alphabet>/<character>/<image>``: every
folder that directly holds images is a class, named by its path relative to the dataset root
(posix, e.g. ``"Angelic/character01"``). Inside a zip a single top folder (e.g.
``images_background/``) is stripped. Hidden files and folders (and ``__MACOSX``) are skipped;
files without an image extension are ignored.
"""

from __future__ import annotations

import os
import threading
import warnings
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image

from fewshot_studio.data.images import IMAGE_EXTENSIONS, ImageLoadError, load_image
from fewshot_studio.errors import UserError


def some_names(names: Sequence[str], n: int = 5) -> str:
    """``"'a', 'b' and 3 more"``: the first ``n`` of ``names`` (repr) for a message."""
    shown = ", ".join(repr(c) for c in names[:n])
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return f"{shown}{more}"


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
                raise UserError(f"class {some_names(missing)} not found in {self.root}")
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
                roots_s = ", ".join(str(p.root) for p in parts)
                raise UserError(f"class {some_names(missing)} not found in {roots_s}")
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
