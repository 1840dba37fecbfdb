"""Where the shared data lives, the Omniglot Vinyals split files, rotation class names
(``"<class>/rot090"``) and held-out class splits.

Data location: functions that need the shared data take a ``data_dir``; when it is None they use
the environment variable ``FEWSHOT_DATA`` and else ``<repo>/../shared/data``
(:func:`default_data_dir`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fewshot_studio.errors import UserError

ROTATION_SUFFIX = "rot"
"""Rotation classes are named ``"<class>/rot090"`` (degrees, 3 digits), as in the Vinyals splits."""


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


_DRAWER = re.compile(r"_(\d+)\.[A-Za-z0-9]+$")


def alphabet_of(class_name: str) -> str | None:
    """The group of a nested class: its first folder level (``"Angelic/character01/rot090"``
    -> ``"Angelic"``); None for a flat class name."""
    head, sep, _ = class_name.partition("/")
    return head if sep else None


def drawer_of(file_name: str) -> int | None:
    """The drawer of an Omniglot image: the file name's ``_NN`` suffix (``"0965_17.png"`` ->
    17; every character of images_background / images_evaluation has one image by each of
    the drawers 01..20); None when the name has no such suffix."""
    m = _DRAWER.search(file_name.rpartition("/")[2])
    return int(m.group(1)) if m else None


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
