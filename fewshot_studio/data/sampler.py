"""Episodic sampling: N-way K-shot Q-query tasks over any labelled set of images.

The sampler works on class ids only (``targets``), so it serves an :class:`InMemoryImages`
store, a :class:`ClassFolderDataset` or the engine's support sets alike. Per-class index
arrays are padded into one (C, M) matrix once, so drawing an episode is a few vectorised
numpy calls (tens of microseconds, even 60-way).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
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

    def _name(self, cid: int) -> str:
        if self.class_names is not None and 0 <= cid < len(self.class_names):
            return self.class_names[cid]
        return str(cid)

    @property
    def num_classes(self) -> int:
        return int(self.class_ids.size)

    def sample(self, rng: np.random.Generator | None = None) -> Episode:
        """One episode drawn from ``rng`` (default: the sampler's own stream)."""
        rng = self._rng if rng is None else rng
        rows = rng.choice(self.class_ids.size, size=self.n_way, replace=False)
        keys = rng.random((self.n_way, self._index.shape[1]))
        if not self._uniform:
            keys[self._pad[rows]] = 2.0  # padding sorts last
        k = self.n_shot + self.n_query
        if k < keys.shape[1]:
            pick = np.argpartition(keys, k - 1, axis=1)[:, :k]
        else:
            pick = np.argsort(keys, axis=1)
        chosen = np.take_along_axis(self._index[rows], pick, axis=1)  # (n_way, k), random order
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
