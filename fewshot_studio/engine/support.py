"""The support set of a labeling session: the classes (name -> example images, in class
order), the cached features of their examples, and the user's corrections of query images
(which join their class's support when ``LabelSettings.corrections_join_support``)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from fewshot_studio.engine.query_store import _QueryStore
from fewshot_studio.errors import UserError


def abs_path(p: str | os.PathLike[str]) -> Path:
    """``p`` made absolute (not resolved: a link keeps its own name)."""
    return Path(os.path.abspath(os.fspath(p)))


class SupportSet:
    """Classes, example features and corrections. ``feats``: example path -> feature (or
    why it has none), filled by the session through the embedding pipeline;
    ``corrected_feats``: the features of corrected query images, kept once read so that a
    correction survives a new query set."""

    def __init__(self) -> None:
        self.classes: dict[str, list[Path]] = {}
        self.feats: dict[Path, np.ndarray | str] = {}
        self.corrections: dict[Path, str] = {}
        self.corrected_feats: dict[Path, np.ndarray] = {}

    @property
    def names(self) -> list[str]:
        """Class names; class index = position."""
        return list(self.classes)

    def set_classes(self, classes: Mapping[str, Sequence[Path]]) -> None:
        """Replace all classes (ordered). UserError for an empty class name."""
        out: dict[str, list[Path]] = {}
        for name, paths in classes.items():
            name = str(name)
            if not name.strip():
                raise UserError("a class has an empty name")
            out[name] = [abs_path(p) for p in paths]
        self.classes = out

    def with_corrections(self, join: bool) -> dict[str, list[Path]]:
        """The examples per class, plus (``join``) the corrected query images of each."""
        out = {k: list(v) for k, v in self.classes.items()}
        if join:
            for path, label in sorted(self.corrections.items()):
                if label in out and path not in out[label]:
                    out[label].append(path)
        return out

    def correct(self, paths: Sequence[Path], label: str | None) -> None:
        """Set (or with ``label=None`` remove) the user's label of query images."""
        if label is not None and label not in self.classes:
            raise UserError(f"unknown class {label!r} (classes: {', '.join(self.classes)})")
        for p in paths:
            p = abs_path(p)
            if label is None:
                self.corrections.pop(p, None)
                self.corrected_feats.pop(p, None)
            else:
                self.corrections[p] = label

    def validate(self) -> None:
        """UserError unless there are >= 2 classes, each with an example image."""
        if len(self.classes) < 2:
            raise UserError(f"need at least 2 classes, got {len(self.classes)}")
        for name, paths in self.classes.items():
            if not paths:
                raise UserError(f"class {name!r} has no example images")

    def missing(self) -> list[Path]:
        """Example images without a feature (or error) yet, sorted."""
        return sorted({p for ps in self.classes.values() for p in ps} - set(self.feats))

    def check_readable(self) -> None:
        """UserError naming a class none of whose examples could be read."""
        for name, paths in self.classes.items():
            if not any(isinstance(self.feats.get(p), np.ndarray) for p in paths):
                reasons = "; ".join(f"{p.name}: {self.feats.get(p)}" for p in paths[:3])
                raise UserError(f"class {name!r} has no readable example image ({reasons})")

    def n_readable(self) -> int:
        """Class examples with a feature."""
        return sum(isinstance(self.feats.get(p), np.ndarray)
                   for ps in self.classes.values() for p in ps)

    def rows(self, join: bool, store: _QueryStore
             ) -> tuple[torch.Tensor, torch.Tensor, list[Path]]:
        """The support set's ``(n_s, *feature_shape)`` features, ``(n_s,)`` labels and each
        row's path: the class examples (in class order) first, then (``join``) the corrected
        query images, their features read from ``store`` (and kept) or kept from before."""
        feats: list[np.ndarray] = []
        labels: list[int] = []
        paths: list[Path] = []
        for c, name in enumerate(self.classes):
            for p in self.classes[name]:
                f = self.feats.get(p)
                if isinstance(f, np.ndarray):
                    feats.append(f)
                    labels.append(c)
                    paths.append(p)
        if join:
            cls = {n: i for i, n in enumerate(self.classes)}
            for p, label in sorted(self.corrections.items()):
                if label not in cls or p in self.classes[label]:
                    continue
                f = self._corrected_feature(p, store)
                if f is not None:
                    feats.append(f)
                    labels.append(cls[label])
                    paths.append(p)
        x = torch.from_numpy(np.stack(feats).astype(np.float32, copy=False))
        return x, torch.tensor(labels, dtype=torch.long), paths

    def _corrected_feature(self, p: Path, store: _QueryStore) -> np.ndarray | None:
        f = self.corrected_feats.get(p)
        if f is None and p in store.index:
            f = store.feature(store.index[p])
            if f is not None:
                self.corrected_feats[p] = f
        return f
