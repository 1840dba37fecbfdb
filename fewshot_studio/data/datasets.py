"""Datasets for few-shot training and evaluation: one import point, plus Omniglot.

* :mod:`.class_folders`: class-folder datasets (a folder or a .zip read in place);
* :mod:`.splits`: the data location, Vinyals split files, rotation class names;
* :mod:`.in_memory`: :class:`InMemoryImages` (uint8 store) and threaded :func:`preload`.

Everything they define is importable from here too. The Omniglot files are
``<data_dir>/omniglot/images_background.zip``, ``images_evaluation.zip`` and
``splits/vinyals_{train,val,trainval,test}.txt`` (``data_dir``: see :func:`default_data_dir`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

# Re-exported: the pieces used to live here, and callers import them from this module.
from fewshot_studio.data.class_folders import (  # noqa: F401
    AnyClassDataset,
    ClassFolderDataset,
    ConcatClassFolderDataset,
    _hidden,
    _is_image_name,
    open_dataset,
)
from fewshot_studio.data.in_memory import (  # noqa: F401
    InMemoryImages,
    _check_rotations,
    normalize_batch,
    preload,
    preload_steps,
)
from fewshot_studio.data.preprocess import Preprocess
from fewshot_studio.data.splits import (  # noqa: F401
    ROTATION_SUFFIX,
    default_data_dir,
    load_split,
    omniglot_dir,
    rotation_class_name,
    split_classes,
    split_rotation,
)
from fewshot_studio.progress import Progress

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
