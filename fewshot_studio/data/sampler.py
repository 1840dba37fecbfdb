"""Episodic sampling: N-way K-shot Q-query tasks over any labelled set of images.

The sampler works on class ids only (``targets``), so it serves an :class:`InMemoryImages`
store, a :class:`ClassFolderDataset` or the engine's support sets alike. Per-class index
arrays are padded into one (C, M) matrix once, so drawing an episode is a few vectorised
numpy calls (tens of microseconds, even 60-way).

Within-group episodes (Lake et al. 2015's hardest one-shot test): given a group per class (an
Omniglot alphabet) and a drawer per image, an episode's classes all come from one group, and
its support and query images come from different drawers (one episode-wide set of
``n_shot`` support drawers and ``n_query`` other query drawers, one image per class and
drawer). ``group_fraction`` mixes such episodes into the ordinary random-class stream.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fewshot_studio.errors import UserError


@dataclass(frozen=True)
class Episode:
    """One N-way task. Indices point into the dataset the sampler was built on; labels are the
    episode's own class numbers 0..n_way-1, class-major (all shots of class 0 first).

    support: int64 (n_way*n_shot,); support_labels: int64 (n_way*n_shot,);
    query: int64 (n_way*n_query,); query_labels: int64 (n_way*n_query,);
    classes: int64 (n_way,) dataset class id of episode label i.
    """

    support: torch.Tensor
    support_labels: torch.Tensor
    query: torch.Tensor
    query_labels: torch.Tensor
    classes: torch.Tensor

    @property
    def n_way(self) -> int:
        return int(self.classes.numel())


class EpisodeSampler:
    """Draws episodes of ``n_way`` distinct classes, each with ``n_shot`` support and
    ``n_query`` query images, disjoint, without replacement within a class.

    ``targets``: class id per dataset item (N,). ``seed``: iterating yields an endless,
    deterministic stream (the sampler keeps its generator state; see :meth:`state_dict`);
    :meth:`episodes` gives a fixed list that depends only on ``seed`` (for evaluation).
    ``classes``: restrict to these class ids. Raises :class:`UserError` naming the class when
    there are fewer than ``n_way`` classes or a class has fewer than ``n_shot + n_query`` images.

    Within-group episodes (see the module docstring): ``groups`` gives each class id's group
    (indexed by class id, e.g. its alphabet's name); ``drawers`` each item's drawer (N,)
    (None: unknown, then support and query differ by image only); ``group_fraction`` of the
    episodes (1.0: all) are drawn from one group, the rest as usual. A group is used when it
    has at least ``n_way`` classes and, with drawers, at least ``n_shot + n_query`` drawers
    that drew every one of its classes (``groups_used`` / ``groups_skipped``); a
    :class:`UserError` when none is. Without ``groups`` the stream is exactly the plain one.
    """

    def __init__(
        self,
        targets: torch.Tensor | np.ndarray | Sequence[int],
        n_way: int,
        n_shot: int,
        n_query: int,
        seed: int = 0,
        class_names: Sequence[str] | None = None,
        classes: Sequence[int] | None = None,
        groups: Sequence[Hashable] | None = None,
        drawers: torch.Tensor | np.ndarray | Sequence[int] | None = None,
        group_fraction: float = 1.0,
    ) -> None:
        if isinstance(targets, torch.Tensor):
            t = targets.detach().cpu().numpy()
        else:
            t = np.asarray(targets)
        t = t.astype(np.int64, copy=False).reshape(-1)
        if n_way < 1 or n_shot < 1 or n_query < 0:
            raise UserError(
                f"invalid episode shape: way={n_way}, shot={n_shot}, query={n_query} "
                "(need way >= 1, shot >= 1, query >= 0)"
            )
        self.n_way, self.n_shot, self.n_query = int(n_way), int(n_shot), int(n_query)
        self.seed = int(seed)
        self.class_names = list(class_names) if class_names is not None else None

        ids = np.unique(t) if classes is None else np.asarray(sorted(set(classes)), np.int64)
        order = np.argsort(t, kind="stable")
        sorted_t = t[order]
        starts = np.searchsorted(sorted_t, ids, side="left")
        ends = np.searchsorted(sorted_t, ids, side="right")
        counts = ends - starts

        need = self.n_shot + self.n_query
        if ids.size < self.n_way:
            raise UserError(
                f"{self.n_way}-way episodes need at least {self.n_way} classes, "
                f"but the data has {ids.size}"
            )
        short = np.nonzero(counts < need)[0]
        if short.size:
            names = ", ".join(f"{self._name(int(ids[i]))!r} ({int(counts[i])})" for i in short[:5])
            more = f" and {short.size - 5} more" if short.size > 5 else ""
            raise UserError(
                f"class {names}{more}: fewer than shot+query = {self.n_shot}+{self.n_query} = "
                f"{need} images"
            )
        self.class_ids = ids
        self.counts = counts
        m = int(counts.max())
        self._index = np.zeros((ids.size, m), dtype=np.int64)  # (C, M) padded per-class indices
        self._pad = np.arange(m)[None, :] >= counts[:, None]  # (C, M) True where padding
        for i, (s, e) in enumerate(zip(starts, ends, strict=True)):
            self._index[i, : e - s] = order[s:e]
        self._uniform = bool((counts == m).all())
        self._rng = np.random.default_rng(self.seed)
        self._support_labels = torch.arange(self.n_way).repeat_interleave(self.n_shot)
        self._query_labels = torch.arange(self.n_way).repeat_interleave(self.n_query)
        if not 0.0 <= group_fraction <= 1.0:
            raise UserError(f"the within-group fraction must be in [0, 1], got {group_fraction}")
        self.group_fraction = float(group_fraction)
        self.groups_used: list[Hashable] = []
        self.groups_skipped: list[Hashable] = []
        self._group_rows: list[np.ndarray] = []  # per used group: its rows of class_ids
        self._group_pool: list[np.ndarray] = []  # per used group: drawers common to its classes
        self._dcount: np.ndarray | None = None  # (C, D) images per class row and drawer
        self._dindex: np.ndarray | None = None  # (C, D, M) their indices, padded
        if groups is not None and self.group_fraction > 0.0:
            self._setup_groups(t, groups, drawers)

    def _setup_groups(self, t: np.ndarray, groups: Sequence[Hashable],
                      drawers: torch.Tensor | np.ndarray | Sequence[int] | None) -> None:
        """Index the classes by group and (with ``drawers``) the images by class and drawer;
        keep the groups that can give an episode. ``t``: (N,) class id per item."""
        ids = self.class_ids
        if len(groups) <= int(ids.max()):
            raise ValueError(f"groups has {len(groups)} entries, class ids go to {int(ids.max())}")
        need = self.n_shot + self.n_query
        if drawers is not None:
            d = (drawers.detach().cpu().numpy() if isinstance(drawers, torch.Tensor)
                 else np.asarray(drawers)).astype(np.int64, copy=False).reshape(-1)
            if d.shape != t.shape:
                raise ValueError(f"drawers has {d.size} entries for {t.size} items")
            row_of = np.full(int(max(t.max(), ids.max())) + 1, -1, np.int64)
            row_of[ids] = np.arange(ids.size)
            rows = row_of[t]
            keep = np.flatnonzero(rows >= 0)
            uniq, dcol = np.unique(d[keep], return_inverse=True)
            cell = rows[keep] * uniq.size + dcol  # (class row, drawer) per kept item
            counts = np.bincount(cell, minlength=ids.size * uniq.size)
            order = np.argsort(cell, kind="stable")
            first = np.searchsorted(cell[order], np.arange(counts.size))
            m = max(1, int(counts.max()))
            slot = np.arange(order.size) - first[cell[order]]
            dindex = np.zeros((counts.size, m), np.int64)
            dindex[cell[order], slot] = keep[order]
            self._dcount = counts.reshape(ids.size, uniq.size)
            self._dindex = dindex.reshape(ids.size, uniq.size, m)
        by_group: dict[Hashable, list[int]] = {}
        for row, cid in enumerate(ids.tolist()):
            by_group.setdefault(groups[cid], []).append(row)
        for g, rows_g in by_group.items():
            r = np.asarray(rows_g, np.int64)
            pool = (np.flatnonzero((self._dcount[r] > 0).all(axis=0))
                    if self._dcount is not None else np.zeros(0, np.int64))
            if r.size >= self.n_way and (self._dcount is None or pool.size >= need):
                self.groups_used.append(g)
                self._group_rows.append(r)
                self._group_pool.append(pool)
            else:
                self.groups_skipped.append(g)
        if not self.groups_used:
            largest = max(by_group.items(), key=lambda kv: len(kv[1]))
            drawn = (f" whose images come from at least shot+query = {need} drawers that drew "
                     "all of them" if self._dcount is not None else "")
            raise UserError(
                f"within-group {self.n_way}-way episodes: no group (alphabet) has "
                f"{self.n_way} classes{drawn}; the largest, {str(largest[0])!r}, has "
                f"{len(largest[1])} classes")

    def _name(self, cid: int) -> str:
        if self.class_names is not None and 0 <= cid < len(self.class_names):
            return self.class_names[cid]
        return str(cid)

    @property
    def num_classes(self) -> int:
        return int(self.class_ids.size)

    @property
    def within_groups(self) -> bool:
        """Whether some episodes are drawn from one group (see the class docstring)."""
        return bool(self._group_rows)

    @property
    def by_drawers(self) -> bool:
        """Whether within-group episodes keep support and query drawers apart."""
        return self._dcount is not None

    def sample(self, rng: np.random.Generator | None = None) -> Episode:
        """One episode drawn from ``rng`` (default: the sampler's own stream)."""
        rng = self._rng if rng is None else rng
        if self._group_rows and (self.group_fraction >= 1.0
                                 or rng.random() < self.group_fraction):
            return self._sample_within_group(rng)
        rows = rng.choice(self.class_ids.size, size=self.n_way, replace=False)
        return self._episode(rows, self._pick(rows, rng))

    def _sample_within_group(self, rng: np.random.Generator) -> Episode:
        """An episode whose classes share one group; with drawers, support images by
        ``n_shot`` drawers and query images by ``n_query`` other drawers (episode-wide)."""
        g = int(rng.integers(len(self._group_rows)))
        rows_g = self._group_rows[g]
        rows = rows_g[rng.choice(rows_g.size, size=self.n_way, replace=False)]
        if self._dcount is None or self._dindex is None:
            return self._episode(rows, self._pick(rows, rng))
        pool = self._group_pool[g]
        k = self.n_shot + self.n_query
        ds = pool[rng.choice(pool.size, size=k, replace=False)]  # (k,) support first
        cnt = self._dcount[rows[:, None], ds[None, :]]  # (n_way, k), all >= 1
        j = (rng.random((self.n_way, k)) * cnt).astype(np.int64)  # one image per cell
        return self._episode(rows, self._dindex[rows[:, None], ds[None, :], j])

    def _pick(self, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """(n_way,) class rows -> (n_way, n_shot + n_query) distinct item indices per class,
        in random order."""
        keys = rng.random((self.n_way, self._index.shape[1]))
        if not self._uniform:
            keys[self._pad[rows]] = 2.0  # padding sorts last
        k = self.n_shot + self.n_query
        if k < keys.shape[1]:
            pick = np.argpartition(keys, k - 1, axis=1)[:, :k]
        else:
            pick = np.argsort(keys, axis=1)
        return np.take_along_axis(self._index[rows], pick, axis=1)  # (n_way, k), random order

    def _episode(self, rows: np.ndarray, chosen: np.ndarray) -> Episode:
        """The Episode of (n_way,) class rows and their (n_way, n_shot + n_query) items
        (the first ``n_shot`` of each row are its support)."""
        k = self.n_shot + self.n_query
        support = torch.from_numpy(np.ascontiguousarray(chosen[:, : self.n_shot]).reshape(-1))
        query = torch.from_numpy(np.ascontiguousarray(chosen[:, self.n_shot : k]).reshape(-1))
        return Episode(
            support=support,
            support_labels=self._support_labels.clone(),
            query=query,
            query_labels=self._query_labels.clone(),
            classes=torch.from_numpy(self.class_ids[rows].copy()),
        )

    def __iter__(self) -> Iterator[Episode]:
        while True:
            yield self.sample()

    def sample_batch(self, n_tasks: int) -> list[Episode]:
        """``n_tasks`` episodes from the sampler's stream (a meta-batch)."""
        return [self.sample() for _ in range(n_tasks)]

    def episodes(self, n: int, seed: int | None = None) -> list[Episode]:
        """A fixed list of ``n`` episodes that depends only on ``seed`` (default: the sampler's
        seed), not on what was drawn before: the same evaluation episodes every time."""
        rng = np.random.default_rng(self.seed if seed is None else seed)
        return [self.sample(rng) for _ in range(n)]

    def state_dict(self) -> dict[str, Any]:
        """The stream's position (JSON-serialisable), for resuming training."""
        st = self._rng.bit_generator.state
        inner = {k: str(v) for k, v in st["state"].items()}  # 128-bit ints as strings
        return {
            "seed": self.seed,
            "bit_generator": {**st, "state": inner},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        st = dict(state["bit_generator"])
        st["state"] = {k: int(v) for k, v in st["state"].items()}
        self._rng.bit_generator.state = st


def stack_episodes(episodes: Sequence[Episode]) -> Episode:
    """Stack T episodes of one shape into an Episode whose tensors have a leading (T,) axis."""
    return Episode(
        support=torch.stack([e.support for e in episodes]),
        support_labels=torch.stack([e.support_labels for e in episodes]),
        query=torch.stack([e.query for e in episodes]),
        query_labels=torch.stack([e.query_labels for e in episodes]),
        classes=torch.stack([e.classes for e in episodes]),
    )
