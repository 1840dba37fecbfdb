"""Training data: choose the train / validation classes (``config.split``), check that every
class has enough images (a :class:`UserError` before any loading) and preload the images as
uint8 onto the training device. Also :func:`load_eval_images` for ``fewshot-studio eval``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fewshot_studio.data.preprocess import Preprocess
from fewshot_studio.errors import UserError
from fewshot_studio.io.checkpoint import Checkpoint, load_checkpoint
from fewshot_studio.models.base import FewShotClassifier
from fewshot_studio.paths import resolve_checkpoint
from fewshot_studio.training.config import TrainConfig
from fewshot_studio.training.distributed import resolve_device
from fewshot_studio.training.evaluate import default_query


@dataclass
class TrainData:
    """Preloaded training and validation images (uint8 on the device) and what was skipped."""

    train: Any  # InMemoryImages
    val: Any | None
    skipped: list[tuple[str, str]] = field(default_factory=list)
    train_classes: list[str] = field(default_factory=list)
    val_classes: list[str] = field(default_factory=list)
    val_query: int = 15


def rotation_name(base: str, rotation: int) -> str:
    """The class name of ``base`` rotated by ``rotation`` degrees (``"<base>/rot090"``)."""
    return f"{base}/rot{rotation:03d}"


def _split_rotation(name: str) -> tuple[str, int | None]:
    """``"Alpha/char01/rot090"`` -> ``("Alpha/char01", 90)``; no suffix -> ``(name, None)``."""
    head, _, tail = name.rpartition("/")
    if head and len(tail) == 6 and tail.startswith("rot") and tail[3:].isdigit():
        return head, int(tail[3:])
    return name, None


def _read_class_list(path: str | Path) -> list[str]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"class list not found: {p}")
    lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


def _split_file(name: str, splits_dir: str | None) -> list[str]:
    """Lines of a named split (``vinyals_train`` ...) from ``splits_dir`` (default: the data
    module's location, ``$FEWSHOT_DATA`` or ``<repo>/../shared/data``)."""
    from fewshot_studio.data.datasets import load_split

    return list(load_split(name, splits_dir))


def _selection(lines: Sequence[str], default_rotations: Sequence[int]
               ) -> dict[str, tuple[int, ...]]:
    """Class-list lines (optionally with ``/rotNNN``) -> base class -> rotations."""
    sel: dict[str, set[int]] = {}
    for line in lines:
        base, rot = _split_rotation(line)
        sel.setdefault(base, set()).update([rot] if rot is not None else default_rotations)
    return {k: tuple(sorted(v)) for k, v in sel.items()}


def _open_datasets(paths: Sequence[str]) -> list[Any]:
    from fewshot_studio.data.datasets import ClassFolderDataset

    out = []
    for p in paths:
        path = Path(p).expanduser()
        if not path.exists():
            raise UserError(f"data not found: {path}")
        ds = ClassFolderDataset(path)
        if not ds.class_names:
            raise UserError(f"no class folders with images in {path}")
        out.append(ds)
    return out


def choose_split(config: TrainConfig, base_classes: Sequence[str]
                 ) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """Train and validation classes (base name -> rotations) for ``config.split``."""
    rots = config.rotations
    names = sorted(base_classes)
    known = set(names)

    def check(sel: dict[str, tuple[int, ...]], what: str) -> None:
        missing = sorted(set(sel) - known)
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise UserError(f"{len(missing)} classes of the {what} are not in the data: "
                            f"{', '.join(missing[:5])}{more}")

    if config.split in ("vinyals", "vinyals-trainval"):
        train_name = "vinyals_train" if config.split == "vinyals" else "vinyals_trainval"
        train = _selection(_split_file(train_name, config.splits_dir), rots)
        val = _selection(_split_file("vinyals_val", config.splits_dir), (0,))
        check(train, f"{train_name} split (pass every dataset it names, e.g. both Omniglot "
                     "zips)")
        check(val, "vinyals_val split")
        return train, val
    if config.split == "files":
        val = _selection(_read_class_list(config.val_classes or ""), (0,))
        check(val, f"validation class list {config.val_classes}")
        if config.train_classes:
            train = _selection(_read_class_list(config.train_classes), rots)
            check(train, f"training class list {config.train_classes}")
        else:
            train = {n: tuple(rots) for n in names if n not in val}
        overlap = sorted(set(train) & set(val))
        if overlap:
            raise UserError(f"classes in both the training and validation lists: "
                            f"{', '.join(overlap[:5])}")
        return train, val
    if config.split == "none":
        return {n: tuple(rots) for n in names}, {}

    rng = np.random.default_rng(config.seed)
    n_val = max(config.val_way, round(config.val_fraction * len(names)))
    if config.split == "groups":
        groups: dict[str, list[str]] = {}
        for n in names:
            groups.setdefault(n.rpartition("/")[0] or n, []).append(n)
        keys = sorted(groups)
        if len(keys) < 2:
            raise UserError("split 'groups' needs classes in at least two top-level folders")
        val_names: list[str] = []
        for i in rng.permutation(len(keys)):
            if len(val_names) >= n_val:
                break
            val_names.extend(groups[keys[int(i)]])
    else:
        val_names = [names[int(i)] for i in rng.permutation(len(names))[:n_val]]
    val_set = set(val_names)
    train = {n: tuple(rots) for n in names if n not in val_set}
    need_train = math.ceil(config.way / max(1, len(rots)))
    if len(train) < need_train:
        raise UserError(
            f"the data has {len(names)} classes: too few for {config.way}-way training on "
            f"{need_train} classes plus {len(val_set)} classes held out for "
            f"{config.val_way}-way validation (use --split none, a smaller --way, or more "
            "classes)")
    return train, {n: (0,) for n in sorted(val_set)}


def _check_counts(sel: dict[str, tuple[int, ...]], counts: dict[str, int],
                  where: dict[str, str], way: int, need: int, what: str) -> None:
    n_classes = sum(len(r) for r in sel.values())
    if n_classes < way:
        raise UserError(f"{way}-way {what} needs at least {way} classes, but there are "
                        f"{n_classes}")
    short = sorted(n for n in sel if counts.get(n, 0) < need)
    if short:
        desc = ", ".join(f"{n!r} in {where.get(n, '?')} ({counts.get(n, 0)} images)"
                         for n in short[:5])
        more = f" and {len(short) - 5} more" if len(short) > 5 else ""
        raise UserError(f"class {desc}{more}: fewer than the {need} images (shot + query) "
                        f"that {what} episodes need")


def merge_images(parts: Sequence[Any]) -> Any:
    """Concatenate InMemoryImages, merging classes of the same name."""
    from fewshot_studio.data.datasets import InMemoryImages

    if len(parts) == 1:
        return parts[0]
    names: list[str] = []
    index: dict[str, int] = {}
    images, targets, skipped = [], [], []
    files: list[str] | None = [] if all(p.files for p in parts) else None
    for p in parts:
        mapping = torch.tensor([index.setdefault(n, len(index)) for n in p.class_names],
                               dtype=torch.long)
        for n in p.class_names:
            if n not in names:
                names.append(n)
        images.append(p.images)
        targets.append(mapping.to(p.targets.device)[p.targets])
        skipped.extend(p.skipped)
        if files is not None:
            files.extend(p.files)
    return InMemoryImages(images=torch.cat(images), targets=torch.cat(targets),
                          class_names=names, skipped=skipped, files=files or [])


def _preload(datasets: Sequence[Any], sel: dict[str, tuple[int, ...]], pre: Preprocess,
             size: int | None, device: torch.device) -> Any:
    from fewshot_studio.data.datasets import preload

    parts = []
    for ds in datasets:
        mine = [n for n in ds.class_names if n in sel]
        if not mine:
            continue
        rots = sorted({r for n in mine for r in sel[n]})
        sub = ds.select(mine)
        imgs = preload(sub, pre, rotations=rots, size=size)
        wanted = [rotation_name(n, r) if rots != [0] else n for n in mine for r in sel[n]]
        if rots != [0]:
            wanted = [_loaded_name(imgs.class_names, w) for w in wanted]
        if wanted != list(imgs.class_names):
            imgs = imgs.subset_classes(wanted)
        parts.append(imgs)
    return merge_images(parts).to(device)


def _loaded_name(loaded: Sequence[str], wanted: str) -> str:
    """The name preload gave a rotated class (rotation 0 may carry no suffix)."""
    if wanted in loaded:
        return wanted
    base, rot = _split_rotation(wanted)
    if rot == 0 and base in loaded:
        return base
    return wanted


def prepare_data(config: TrainConfig, device: torch.device) -> TrainData:
    """Open the datasets, choose the split, check counts (UserError before any loading) and
    preload train / validation images as uint8 onto ``device``."""
    datasets = _open_datasets(config.data)
    counts: dict[str, int] = {}
    where: dict[str, str] = {}
    for ds in datasets:
        per_class = np.bincount(np.asarray(ds.targets), minlength=len(ds.class_names))
        for i, n in enumerate(ds.class_names):
            counts[n] = counts.get(n, 0) + int(per_class[i])
            where.setdefault(n, str(ds.root))
    train_sel, val_sel = choose_split(config, list(counts))
    _check_counts(train_sel, counts, where, config.way, config.shot + config.query, "training")
    val_query = config.val_query
    if config.has_validation and val_sel:
        if val_query is None:
            val_query = default_query(config.val_shot, min(counts[n] for n in val_sel))
        _check_counts(val_sel, counts, where, config.val_way, config.val_shot + val_query,
                      "validation")
    train = _preload(datasets, train_sel, config.preprocess, None, device)
    val = None
    if config.has_validation and val_sel:
        val = _preload(datasets, val_sel, config.preprocess, None, device)
    skipped = list(train.skipped) + (list(val.skipped) if val is not None else [])
    return TrainData(train, val, skipped, list(train.class_names),
                     list(val.class_names) if val is not None else [], val_query or 1)


def load_eval_images(data: Sequence[str], pre: Preprocess, classes: str | None = None,
                     splits_dir: str | None = None,
                     device: str | torch.device = "cpu") -> Any:
    """Preload evaluation images (uint8 InMemoryImages on ``device``) from one or more
    datasets. ``classes``: None (every class), a file with one class per line, or a split
    name (``vinyals_test``, ``test`` ...); ``/rotNNN`` suffixes add rotated classes."""
    datasets = _open_datasets(data)
    names: dict[str, None] = {}
    for ds in datasets:
        names.update(dict.fromkeys(ds.class_names))
    if classes is None:
        sel = {n: (0,) for n in names}
    else:
        lines = (_read_class_list(classes) if Path(classes).expanduser().is_file()
                 else _split_file(classes, splits_dir))
        sel = _selection(lines, (0,))
        missing = sorted(set(sel) - set(names))
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise UserError(f"{len(missing)} classes of {classes} are not in the data: "
                            f"{', '.join(missing[:5])}{more}")
    images = _preload(datasets, sel, pre, None, torch.device(device))
    if images.skipped:
        listed = "; ".join(f"{m} ({why})" for m, why in images.skipped[:10])
        warnings.warn(f"skipped {len(images.skipped)} unreadable files: {listed}", stacklevel=2)
    return images


def load_for_episodes(checkpoint: str, data: Sequence[str], classes: str | None = None,
                      splits_dir: str | None = None, device: str = "auto"
                      ) -> tuple[Path, Checkpoint, FewShotClassifier, Any, torch.device]:
    """What running fixed episodes of a checkpoint needs (``eval``, ``calibrate``):
    ``(checkpoint path, Checkpoint, model in eval mode on the device, InMemoryImages,
    device)``. ``checkpoint``: a bundled name or a file; the other arguments as
    :func:`load_eval_images` takes them. One-line UserErrors on bad input."""
    path = resolve_checkpoint(checkpoint)
    ckpt = load_checkpoint(path)
    dev = resolve_device(device)
    images = load_eval_images(data, ckpt.preprocess, classes, splits_dir, dev)
    try:
        model = ckpt.build(dev)
    except (KeyError, RuntimeError, TypeError, ValueError) as e:
        raise UserError(f"{path}: cannot build the model it describes ({e})") from None
    return path, ckpt, model, images, dev
