"""The labeling session: classes (name -> support images), a folder of query images and a
checkpoint in; a :class:`~fewshot_studio.engine.api.Prediction` per query image out.

How it works
------------
* Every image (support or query) goes through ``model.embed`` once; the feature is cached in
  SQLite (:class:`~fewshot_studio.engine.cache.EmbeddingCache`) keyed by absolute path, size,
  mtime and checkpoint identity. A later run over the same files embeds nothing.
* Query images stream in batches: a thread pool decodes (JPEG draft mode) the next batches
  while the backend (ONNX Runtime or torch, see :mod:`.backends`) embeds the current one.
  Only the features are kept (one ``(n_query, d)`` array), never the pixels.
* The support-dependent head (``model.fit`` on support features -> predictor -> logits on
  query features) always runs in torch on the CPU; it is cheap, so a correction, a new
  example or a new threshold recomputes every prediction from the cached features.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import logging
import os
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fewshot_studio.data.images import IMAGE_EXTENSIONS, ImageLoadError, load_and_preprocess
from fewshot_studio.engine.api import (
    BackendInfo,
    EngineCounters,
    LabelSettings,
    Prediction,
    Status,
)
from fewshot_studio.engine.backends import (
    EmbedBackend,
    decode_workers,
    embed_is_identity,
    select_backend,
)
from fewshot_studio.engine.cache import FEATURE_FORMAT, EmbeddingCache, FileKey
from fewshot_studio.errors import UserError
from fewshot_studio.progress import Progress

log = logging.getLogger(__name__)

_HEAD_CHUNK = 16384  # queries scored per predictor call (bounds the head's memory)
_FP32_BUDGET = 512 * 2**20  # keep query features as float32 up to this many bytes, else fp16
DEFAULT_SETTINGS = LabelSettings()
TRANSDUCTIVE_ITERS = 1  # soft k-means iterations (Ren et al. 2018 use one at test time)


def _decode_error(e: BaseException) -> str:
    if isinstance(e, ImageLoadError):
        return str(e) or "unreadable image"
    return f"unreadable image ({type(e).__name__}: {' '.join(str(e).split())[:160]})"


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Run a block with ``n`` torch intra-op threads (restored after)."""
    old = torch.get_num_threads()
    if old == n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _abs(p: str | os.PathLike[str]) -> Path:
    return Path(os.path.abspath(os.fspath(p)))


class _QueryStore:
    """Features of the current query set, in sorted-path order. ``feats`` ``(n, d)``
    (float32, or float16 when large) is allocated when the first feature arrives."""

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
        """``(len(idx), *feature_shape)`` float32 features of rows ``idx``."""
        assert self.feats is not None
        if self._tensor is not None:
            t = self._tensor[torch.from_numpy(idx)]
        else:
            t = torch.from_numpy(self.feats[idx].astype(np.float32))
        return t.reshape(len(idx), *self.feature_shape)

    def feature(self, i: int) -> np.ndarray | None:
        if not self.valid[i] or self.feats is None:
            return None
        return self.feats[i].astype(np.float32).reshape(self.feature_shape)


class LabelingSession:
    """Qt-free labeling session; NOT thread-safe: call it from one worker at a time.

    ``checkpoint``: a bundled name or a path. ``settings``: see
    :class:`~fewshot_studio.engine.api.LabelSettings`. ``cache_path``: the SQLite embedding
    cache (default ``paths.user_cache_dir()/embeddings.sqlite``); exported ONNX models are
    cached in an ``onnx`` folder beside it. ``backend``: "auto" | "onnxruntime" | "torch".

    The backend (ONNX export on first use of a checkpoint, session creation) is built lazily
    on the first call that embeds (:meth:`run`, :meth:`relabel`) or by :meth:`prepare`;
    :attr:`backend` says what will run before that and what really runs after it.
    """

    def __init__(self, checkpoint: str | Path, settings: LabelSettings = DEFAULT_SETTINGS,
                 cache_path: Path | None = None, backend: str = "auto") -> None:
        from fewshot_studio.io.checkpoint import CheckpointError, load_checkpoint
        from fewshot_studio.paths import resolve_checkpoint

        path = resolve_checkpoint(str(checkpoint))
        ckpt = load_checkpoint(path)
        try:
            model = ckpt.build("cpu")
        except Exception as e:
            raise CheckpointError(f"{path}: cannot build the model it describes "
                                  f"({type(e).__name__}: {e})") from None
        self.checkpoint_path = path
        self.checkpoint_name = ckpt.name or path.stem
        self.checkpoint_metadata = ckpt.metadata()
        self.preprocess = ckpt.preprocess
        self.model = model.float().eval()
        self._identity_embed = embed_is_identity(self.model, ckpt.preprocess)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.settings = settings
        self.counters = EngineCounters()
        self.class_names: list[str] = []
        self._prefer = backend
        self._cache = EmbeddingCache(cache_path)
        self.model_id = f"{self._cache.checkpoint_identity(path)}:{FEATURE_FORMAT}"
        self._backend: EmbedBackend | None = None
        self.backend = self._expected_backend()
        self._pool: ThreadPoolExecutor | None = None
        self._support: dict[str, list[Path]] = {}
        self._support_feats: dict[Path, np.ndarray | str] = {}
        self._corrections: dict[Path, str] = {}
        self._corrected_feats: dict[Path, np.ndarray] = {}
        self._store = _QueryStore([])
        self._preds: list[Prediction | None] = []
        self._support_dirty = False

    # -- backend ---------------------------------------------------------------------------
    def _expected_backend(self) -> BackendInfo:
        from fewshot_studio.engine.backends import onnxruntime_providers, torch_cuda_works

        dev = self.settings.device
        cuda_torch = dev != "cpu" and torch_cuda_works()
        providers = onnxruntime_providers()
        if self._prefer == "torch" or not providers or (self._prefer == "auto" and cuda_torch):
            return BackendInfo("torch", "cuda" if cuda_torch else "cpu", "not started")
        ort_cuda = dev != "cpu" and "CUDAExecutionProvider" in providers
        return BackendInfo("onnxruntime", "cuda" if ort_cuda else "cpu", "not started")

    def onnx_path(self) -> Path:
        """The exported ``model.embed`` for this checkpoint (built once, cached by identity)."""
        from fewshot_studio.engine.onnx_export import export_embed_onnx

        out = self._cache.path.parent / "onnx" / f"{self.model_id.split(':')[0][:40]}.onnx"
        if not out.is_file():
            export_embed_onnx(copy.deepcopy(self.model), self.preprocess, out,
                              metadata=self.checkpoint_metadata)
            self.counters.extra["onnx_exports"] = self.counters.extra.get("onnx_exports", 0) + 1
        return out

    def prepare(self) -> BackendInfo:
        """Build the backend now (export to ONNX on first use); returns what runs."""
        if self._backend is None:
            from fewshot_studio.engine.backends import torch_cuda_works

            model = self.model
            if self.settings.device != "cpu" and torch_cuda_works():
                model = copy.deepcopy(self.model)  # a CUDA copy must not move the head
            self._backend = select_backend(model, self.preprocess, self.onnx_path,
                                           self.settings.device, self._prefer)
            self.backend = self._backend.info
        return self.backend

    # -- classes ---------------------------------------------------------------------------
    def set_support(self, classes: Mapping[str, Sequence[Path]]) -> None:
        """Replace all classes (ordered: class index = position). Cheap: nothing is embedded
        until :meth:`run`, :meth:`relabel` or :meth:`correct`."""
        support: dict[str, list[Path]] = {}
        for name, paths in classes.items():
            name = str(name)
            if not name.strip():
                raise UserError("a class has an empty name")
            support[name] = [_abs(p) for p in paths]
        self._support = support
        self.class_names = list(support)
        self._support_dirty = True  # predictions are stale until relabel()/run()

    def support(self) -> dict[str, list[Path]]:
        """The current support per class, including corrected query images that joined it."""
        out = {k: list(v) for k, v in self._support.items()}
        if self.settings.corrections_join_support:
            for path, label in sorted(self._corrections.items()):
                if label in out and path not in out[label]:
                    out[label].append(path)
        return out

    @staticmethod
    def scan_queries(root: Path, recursive: bool = True) -> list[Path]:
        """Image files under ``root`` (absolute, sorted); hidden files and folders skipped."""
        root = _abs(root)
        if not root.exists():
            raise UserError(f"query folder not found: {root}")
        if not root.is_dir():
            raise UserError(f"query folder is not a folder: {root}")
        found: list[Path] = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")) if recursive else []
            for f in filenames:
                if f.startswith(".") or os.path.splitext(f)[1].lower() not in IMAGE_EXTENSIONS:
                    continue
                p = os.path.join(dirpath, f)
                if os.path.isdir(p):
                    continue
                found.append(Path(p))
        return sorted(found)

    def _validate_classes(self) -> None:
        if len(self._support) < 2:
            raise UserError(f"need at least 2 classes, got {len(self._support)}")
        for name, paths in self._support.items():
            if not paths:
                raise UserError(f"class {name!r} has no example images")

    # -- embedding -------------------------------------------------------------------------
    def _decode(self, path: str) -> np.ndarray | str:
        try:
            return load_and_preprocess(path, self.preprocess)
        except Exception as e:
            return _decode_error(e)

    def _get_pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(decode_workers(), thread_name_prefix="fewshot-decode")
        return self._pool

    def _decode_embed(self, paths: Sequence[str]) -> list[np.ndarray | str]:
        """Decode and embed a micro-batch in a pool worker (backends that run concurrently:
        ONNX Runtime on the CPU with one thread per call)."""
        results: list[np.ndarray | str] = [self._decode(p) for p in paths]
        ok = [j for j, r in enumerate(results) if not isinstance(r, str)]
        if ok:
            assert self._backend is not None
            feats = self._backend.embed(np.stack([results[j] for j in ok]))
            for j, f in zip(ok, feats, strict=True):
                results[j] = f
        return results

    def _embed_stream(self, paths: Sequence[Path], prefetch: int = 2
                      ) -> Iterator[tuple[int, list[np.ndarray | str]]]:
        """Features (or error reasons) of ``paths`` in order, by batch of
        ``settings.batch_size``: yields ``(offset, results)``.

        Cache first. Misses are, with a concurrent backend (ONNX Runtime on the CPU), decoded
        and embedded together in pool workers by micro-batches; otherwise decoded in the pool
        and embedded here in one batch (torch, CUDA). ``prefetch`` batches are in flight ahead
        of the one being collected, which bounds memory. New results go to the cache."""
        bs = max(1, int(self.settings.batch_size))
        starts = list(range(0, len(paths), bs))
        pool = self._get_pool()
        pending: deque[tuple[int, list[Any], list[FileKey | None]]] = deque()

        def submit(start: int) -> None:
            chunk = paths[start:start + bs]
            keys: list[FileKey | None] = []
            for p in chunk:
                try:
                    keys.append(FileKey.of(p))
                except OSError:
                    keys.append(None)
            hits = self._cache.lookup(self.model_id, [k for k in keys if k is not None])
            slots: list[Any] = []
            misses: list[int] = []
            for p, k in zip(chunk, keys, strict=True):
                if k is None:
                    slots.append("file not found" if not os.path.lexists(p)
                                 else "cannot read file")
                    continue
                e = hits.get(k.path)
                if e is not None:
                    self.counters.cache_hits += 1
                    slots.append(e.feature if e.feature is not None else e.error)
                else:
                    misses.append(len(slots))
                    slots.append(None)
            if misses:
                self.prepare()
                assert self._backend is not None
                if self._backend.concurrent:
                    m = self._backend.micro_batch
                    for c0 in range(0, len(misses), m):
                        group = misses[c0:c0 + m]
                        fut = pool.submit(self._decode_embed,
                                          [keys[j].path for j in group])  # type: ignore[union-attr]
                        for pos, j in enumerate(group):
                            slots[j] = ("embedded", fut, pos)
                else:
                    for j in misses:
                        slots[j] = ("decoded", pool.submit(self._decode, keys[j].path), 0)  # type: ignore[union-attr]
            pending.append((start, slots, keys))

        def count_decode_error() -> None:
            self.counters.extra["decode_errors"] = self.counters.extra.get("decode_errors", 0) + 1

        it = iter(starts)
        try:
            for s in it:
                submit(s)
                if len(pending) > prefetch:
                    break
            while pending:
                start, slots, keys = pending.popleft()
                nxt = next(it, None)
                if nxt is not None:
                    submit(nxt)
                decoded: list[tuple[int, np.ndarray]] = []
                results: list[np.ndarray | str] = []
                new_rows: list[tuple[FileKey, np.ndarray | None, str]] = []
                for j, slot in enumerate(slots):
                    if not isinstance(slot, tuple):
                        results.append(slot)  # cache hit or stat error
                        continue
                    kind, fut, pos = slot
                    r = fut.result()[pos] if kind == "embedded" else fut.result()
                    k = keys[j]
                    assert k is not None
                    if isinstance(r, str):
                        count_decode_error()
                        new_rows.append((k, None, r))
                    elif kind == "embedded":
                        self.counters.embedded += 1
                        new_rows.append((k, r, ""))
                    else:
                        decoded.append((j, r))
                    results.append(r)
                if decoded:
                    assert self._backend is not None
                    feats = self._backend.embed(np.stack([a for _, a in decoded]))
                    self.counters.embedded += len(decoded)
                    for (j, _), f in zip(decoded, feats, strict=True):
                        results[j] = f
                        k = keys[j]
                        assert k is not None
                        new_rows.append((k, f, ""))
                self._cache.store(self.model_id, new_rows)
                yield start, results
        finally:
            for _, slots, _ in pending:
                for slot in slots:
                    if isinstance(slot, tuple):
                        slot[1].cancel()

    def _ensure_support(self) -> None:
        """Embed (through the cache) support images not seen yet; check every class has a
        readable image (UserError naming the class otherwise)."""
        self._validate_classes()
        missing = sorted({p for ps in self._support.values() for p in ps}
                         - set(self._support_feats))
        for start, results in self._embed_stream(missing):
            for p, r in zip(missing[start:start + len(results)], results, strict=True):
                self._support_feats[p] = r
        for name, paths in self._support.items():
            if not any(isinstance(self._support_feats.get(p), np.ndarray) for p in paths):
                reasons = "; ".join(f"{p.name}: {self._support_feats.get(p)}" for p in paths[:3])
                raise UserError(f"class {name!r} has no readable example image ({reasons})")

    # -- the head --------------------------------------------------------------------------
    def _support_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        feats: list[np.ndarray] = []
        labels: list[int] = []
        for c, name in enumerate(self.class_names):
            for p in self._support[name]:
                f = self._support_feats.get(p)
                if isinstance(f, np.ndarray):
                    feats.append(f)
                    labels.append(c)
        if self.settings.corrections_join_support:
            cls = {n: i for i, n in enumerate(self.class_names)}
            for p, label in sorted(self._corrections.items()):
                if label not in cls or p in self._support[label]:
                    continue
                f = self._corrected_feats.get(p)
                if f is None and p in self._store.index:
                    f = self._store.feature(self._store.index[p])
                    if f is not None:
                        self._corrected_feats[p] = f
                if f is not None:
                    feats.append(f)
                    labels.append(cls[label])
        x = torch.from_numpy(np.stack(feats).astype(np.float32, copy=False))
        return x, torch.tensor(labels, dtype=torch.long)

    def _predictor(self, refine_on: np.ndarray | None = None) -> Callable[[torch.Tensor],
                                                                           torch.Tensor]:
        x, y = self._support_tensors()
        with torch.enable_grad(), self._head_threads():  # MAML adapts with gradients
            predictor = self.model.fit(x, y, len(self.class_names))
        if refine_on is not None and len(refine_on) and hasattr(predictor, "refine"):
            with torch.no_grad(), self._head_threads():
                q = self._store.rows(refine_on)
                predictor = predictor.refine(q, n_iters=TRANSDUCTIVE_ITERS)
            self.counters.extra["transductive"] = self.counters.extra.get("transductive", 0) + 1
        return predictor

    def _head_threads(self) -> contextlib.AbstractContextManager[None]:
        """The head runs single-threaded: its tensors are small, and torch's intra-op
        threads cost milliseconds per call on a busy 2-core machine. Full MAML (whose head is
        the whole network) keeps torch's threads."""
        return contextlib.nullcontext() if self._identity_embed else _torch_threads(1)

    def _probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        fn = getattr(self.model, "probabilities", None)
        if callable(fn):
            return fn(logits)
        return torch.softmax(logits.float(), dim=-1)

    def scorer(self, predictor: Callable[[torch.Tensor], torch.Tensor]
               ) -> Callable[[torch.Tensor], torch.Tensor]:
        """``(n, *feature_shape)`` features -> ``(n, n_way)`` probabilities.

        A Euclidean ProtoNet predictor takes a fast path: softmax is unchanged by a per-row
        constant, so ``-s * ||q - p||^2`` becomes ``s * (2 q.p - ||p||^2)`` (one matrix
        product, no pass over ``||q||^2``). Anything else: softmax of ``predictor(q)`` (or the
        model's own ``probabilities(logits)`` when it has one)."""
        protos = getattr(predictor, "prototypes", None)
        owner = getattr(predictor, "model", None)
        if (isinstance(protos, torch.Tensor) and owner is self.model
                and getattr(owner, "distance", None) == "euclidean"
                and not callable(getattr(self.model, "probabilities", None))):
            scale = float(getattr(owner, "scale", 1.0))
            p = protos.detach().reshape(protos.shape[0], -1).float()
            p2, psq = 2.0 * scale * p, (scale * p.pow(2).sum(-1)).unsqueeze(-1)

            def fast(q: torch.Tensor) -> torch.Tensor:
                # (n_way, d) @ (d, n): ~2x faster than (n, d) @ (d, n_way) for a few classes
                logits = p2 @ q.reshape(q.shape[0], -1).t() - psq
                return torch.softmax(logits.t(), dim=-1)

            return fast

        def generic(q: torch.Tensor) -> torch.Tensor:
            return self._probabilities(predictor(q))

        return generic

    def _predict_range(self, predictor: Callable[[torch.Tensor], torch.Tensor] | None,
                       start: int, stop: int) -> None:
        """Recompute ``self._preds`` for the processed queries in ``[start, stop)``.
        The cyclic GC is paused meanwhile: tens of thousands of new acyclic objects would
        otherwise trigger full collections over everything alive (tens of ms)."""
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            self._predict_range_unpaused(predictor, start, stop)
        finally:
            if was_enabled:
                gc.enable()

    def _head_chunk(self, score: Callable[[torch.Tensor], torch.Tensor]) -> int:
        """Queries per head call: all of them for the ProtoNet fast path (a view and one
        matrix product); else ~64 MB of features x classes (relation pairs); 64 images for
        full MAML, whose head is the whole network (and whose batch statistics then come
        from those 64 queries)."""
        if getattr(score, "__name__", "") == "fast":
            return _HEAD_CHUNK
        if self._identity_embed:
            return 64
        d = max(1, int(np.prod(self._store.feature_shape or (1,))))
        return int(max(32, min(_HEAD_CHUNK, (64 << 20) // (4 * d * max(1, len(self.class_names))))))

    def _predict_range_unpaused(self, predictor: Callable[[torch.Tensor], torch.Tensor] | None,
                                start: int, stop: int) -> None:
        """``predictor=None``: reuse the stored top-k (a new threshold needs no head)."""
        st = self._store
        names = self.class_names
        thr = float(self.settings.unknown_threshold)
        index = st.index
        corr = {index[p]: lab for p, lab in self._corrections.items() if p in index}
        preds = self._preds
        paths = st.paths
        k = min(3, len(names))
        score = self.scorer(predictor) if predictor is not None else None
        names_arr = np.array(names, dtype=object)
        chunk = self._head_chunk(score) if score is not None else _HEAD_CHUNK
        if st.top_p is None or st.top_p.shape[1] != k:
            st.top_p = np.zeros((st.n, k), np.float32)
            st.top_i = np.zeros((st.n, k), np.int64)
        assert st.top_i is not None
        ok_, unknown_, error_ = Status.OK, Status.UNKNOWN, Status.ERROR
        for c0 in range(start, stop, chunk):
            c1 = min(stop, c0 + chunk)
            valid = st.valid[c0:c1].tolist()
            done = st.done[c0:c1].tolist()
            tops: list[tuple[tuple[str, float], ...]] = []
            if any(valid):
                if score is not None:
                    with torch.no_grad(), self._head_threads():
                        top_p, top_i = score(st.block(c0, c1)).topk(k, dim=1)
                    st.top_p[c0:c1], st.top_i[c0:c1] = top_p.numpy(), top_i.numpy()
                # numpy's tolist is faster than torch's; top-k pairs built by zip
                tops = list(map(tuple, map(zip, names_arr[st.top_i[c0:c1]].tolist(),
                                           st.top_p[c0:c1].tolist())))
            for j, (path, is_done, is_valid) in enumerate(zip(paths[c0:c1], done, valid,
                                                              strict=True)):
                if not is_done:
                    continue
                i = c0 + j
                label = corr.get(i) if corr else None
                if not is_valid:
                    reason = st.errors.get(i, "not processed")
                    preds[i] = (Prediction(path, label, 1.0, 1.0, ok_, (), reason, True)
                                if label is not None else
                                Prediction(path, None, 0.0, 0.0, error_, (), reason))
                    continue
                top = tops[j]
                p0 = top[0][1]
                margin = p0 - top[1][1] if k > 1 else p0
                if label is not None:
                    preds[i] = Prediction(path, label, 1.0, 1.0, ok_, top, "", True)
                elif p0 < thr:
                    preds[i] = Prediction(path, None, p0, margin, unknown_, top)
                else:
                    preds[i] = Prediction(path, top[0][0], p0, margin, ok_, top)

    def _relabel_all(self) -> list[Prediction]:
        """Recompute every processed query's prediction from cached features."""
        st = self._store
        if st.done.any():
            refine = np.flatnonzero(st.valid) if self.settings.transductive else None
            self._predict_range(self._predictor(refine), 0, st.n)
        self._support_dirty = False
        self.counters.relabels += 1
        return self.predictions()

    # -- public API ------------------------------------------------------------------------
    def run(self, query_paths: Sequence[Path]) -> Iterator[Progress]:
        """Label ``query_paths`` (any order; labeled in sorted order). Validates the classes
        first (>= 2 classes, each with >= 1 readable image, else UserError naming the class),
        then streams: each yielded Progress carries ``payload`` = the predictions of the
        batch just finished. With transductive refinement (or corrections that join the
        support) a last Progress carries every prediction, recomputed. ``gen.close()``
        cancels cleanly; what finished stays in :meth:`predictions`."""
        paths = sorted({_abs(p) for p in query_paths})
        total = len(paths)
        yield Progress(0, total, "embedding examples")
        self._support_feats = {}  # re-read through the cache: example files may have changed
        self._ensure_support()
        self._store = _QueryStore(paths)
        self._preds = [None] * total
        predictor = self._predictor()
        self._support_dirty = False
        base_corrected = {p for p in self._corrections if p in self._corrected_feats}
        done = 0
        stream = self._embed_stream(paths)
        try:
            for start, results in stream:
                st = self._store
                for j, r in enumerate(results):
                    st.put(start + j, r)
                    if isinstance(r, str):
                        self.counters.errors += 1
                self._predict_range(predictor, start, start + len(results))
                done += len(results)
                batch = [p for p in self._preds[start:start + len(results)] if p is not None]
                yield Progress(done, total, "labeling", payload=batch)
        finally:
            stream.close()
        newly_corrected = {p for p in self._corrections
                           if p in self._store.index and p not in base_corrected}
        if self.settings.transductive or (self.settings.corrections_join_support
                                          and newly_corrected):
            preds = self._relabel_all()
            yield Progress(total, total, "refined", payload=preds)

    def predictions(self) -> list[Prediction]:
        """Every processed query's prediction, sorted by path."""
        return [p for p in self._preds if p is not None]

    def relabel(self) -> list[Prediction]:
        """Recompute every prediction from cached features (after :meth:`set_support`; new
        example images are embedded first, through the cache). Returns all predictions."""
        self._ensure_support()
        return self._relabel_all()

    def set_settings(self, settings: LabelSettings) -> list[Prediction]:
        """New settings; relabels from cached features (a new device or batch size only
        takes effect for the next embedding)."""
        old = self.settings
        self.settings = settings
        if settings.device != old.device:
            if self._backend is not None:
                self._backend.close()
            self._backend = None
            self.backend = self._expected_backend()
        if not self._store.done.any():
            return self.predictions()
        if not self._support_dirty and replace(
                settings, unknown_threshold=old.unknown_threshold, device=old.device,
                batch_size=old.batch_size, recursive=old.recursive) == old:
            # only the threshold (or embedding-side settings) changed: no head needed
            self._predict_range(None, 0, self._store.n)
            self.counters.relabels += 1
            return self.predictions()
        if self._support and len(self._support) >= 2:
            self._ensure_support()
            return self._relabel_all()
        return self.predictions()

    def correct(self, paths: Sequence[Path], label: str | None) -> list[Prediction]:
        """Set (or with ``label=None`` remove) the user's label of query images; corrected
        images join their class's support when ``settings.corrections_join_support``. Every
        prediction is recomputed from cached features (nothing is re-embedded)."""
        if label is not None and label not in self.class_names:
            raise UserError(f"unknown class {label!r} (classes: {', '.join(self.class_names)})")
        for p in paths:
            p = _abs(p)
            if label is None:
                self._corrections.pop(p, None)
                self._corrected_feats.pop(p, None)
            else:
                self._corrections[p] = label
        if not self._store.done.any() or len(self._support) < 2:
            return self.predictions()
        self._ensure_support()
        return self._relabel_all()

    def corrections(self) -> dict[Path, str]:
        return dict(self._corrections)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self._backend is not None:
            self._backend.close()
            self._backend = None
        self._cache.close()

    def __enter__(self) -> LabelingSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def replace_settings(settings: LabelSettings, **changes: Any) -> LabelSettings:
    """``dataclasses.replace`` for settings (convenience for the CLI and GUI)."""
    return replace(settings, **changes)
