"""Features of the current query set of a labeling session (one ``(n_query, d)`` array, never
the pixels), with the last head output per row."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

_FP32_BUDGET = 512 * 2**20  # keep query features as float32 up to this many bytes, else fp16


class _QueryStore:
    """Features of the current query set, in sorted-path order. ``feats`` ``(n, d)``
    (float32, or float16 when large) is allocated when the first feature arrives.

    The float16 rounding of a large set depends only on the set's size, and applies the same
    to a feature just computed and to one read from the cache (which keeps the float32
    values exactly): a cached rerun gives the same predictions as a fresh run."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths
        self.index = {p: i for i, p in enumerate(paths)}
        self.n = len(paths)
        self.feats: np.ndarray | None = None
        self.feature_shape: tuple[int, ...] = ()
        self.valid = np.zeros(self.n, dtype=bool)
        self.done = np.zeros(self.n, dtype=bool)
        self.errors: dict[int, str] = {}
        self._tensor: torch.Tensor | None = None
        # last head output per row: top-k probabilities and class indices (n, k)
        self.top_p: np.ndarray | None = None
        self.top_i: np.ndarray | None = None
        # (n,) conformal p-value of how typical of a known class (adaptive unknown rule)
        self.typical: np.ndarray | None = None

    def put(self, i: int, feature: np.ndarray | str) -> None:
        self.done[i] = True
        if isinstance(feature, str):
            self.errors[i] = feature
            self.valid[i] = False
            return
        flat = feature.reshape(-1)
        if self.feats is None:
            d = flat.size
            dtype = np.float32 if self.n * d * 4 <= _FP32_BUDGET else np.float16
            self.feats = np.zeros((self.n, d), dtype=dtype)
            self.feature_shape = tuple(feature.shape)
            if dtype == np.float32:
                self._tensor = torch.from_numpy(self.feats)  # shares memory
        self.feats[i] = flat
        self.valid[i] = True
        self.errors.pop(i, None)

    def block(self, start: int, stop: int) -> torch.Tensor:
        """``(stop - start, *feature_shape)`` float32 features of rows ``[start, stop)``
        (zeros where invalid); a view when stored as float32."""
        assert self.feats is not None
        if self._tensor is not None:
            t = self._tensor[start:stop]
        else:
            t = torch.from_numpy(self.feats[start:stop].astype(np.float32))
        return t.reshape(stop - start, *self.feature_shape)

    def rows(self, idx: np.ndarray) -> torch.Tensor:
        """``(len(idx), *feature_shape)`` float32 features of rows ``idx`` (sorted, unique:
        all of them gives :meth:`block`'s view, not a copy)."""
        assert self.feats is not None
        if len(idx) == self.n:
            return self.block(0, self.n)
        if self._tensor is not None:
            t = self._tensor[torch.from_numpy(idx)]
        else:
            t = torch.from_numpy(self.feats[idx].astype(np.float32))
        return t.reshape(len(idx), *self.feature_shape)

    def feature(self, i: int) -> np.ndarray | None:
        if not self.valid[i] or self.feats is None:
            return None
        return self.feats[i].astype(np.float32).reshape(self.feature_shape)

