"""The embedding pipeline of a labeling session: a decode thread pool, the embedding backend
(ONNX Runtime or torch, see :mod:`.backends`) and the SQLite feature cache. Query images stream
in batches: the pool decodes the next batches while the backend embeds the current one."""

from __future__ import annotations

import copy
import os
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fewshot_studio.data.images import ImageLoadError, load_and_preprocess
from fewshot_studio.data.preprocess import Preprocess
from fewshot_studio.data.tta import TTA_VIEWS, effective_views, embed_tta, tta_kind
from fewshot_studio.engine.api import BackendInfo, EngineCounters, LabelSettings
from fewshot_studio.engine.backends import EmbedBackend, decode_workers, select_backend
from fewshot_studio.engine.cache import EmbeddingCache, FileKey, file_keys
from fewshot_studio.io.atomic import remove_stale_temps


def _decode_error(e: BaseException) -> str:
    if isinstance(e, ImageLoadError):
        return str(e) or "unreadable image"
    return f"unreadable image ({type(e).__name__}: {' '.join(str(e).split())[:160]})"


class EmbeddingPipeline:
    """Mixin of :class:`~fewshot_studio.engine.session.LabelingSession`: backend selection,
    decoding and cached, streamed embedding. Uses the session's state."""

    model: Any
    preprocess: Preprocess
    settings: LabelSettings
    counters: EngineCounters
    checkpoint_metadata: dict[str, Any]
    model_id: str
    backend: BackendInfo
    _prefer: str
    _cache: EmbeddingCache
    _backend: EmbedBackend | None
    _built_precision: str = ""  # settings.precision the backend was built for
    _pool: ThreadPoolExecutor | None

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
        """The exported ``model.embed`` for this checkpoint (built once, cached by identity)
        in the user cache directory's ``onnx`` folder, wherever the embedding cache is: a
        derived file never goes into the user's folders."""
        from fewshot_studio.engine.onnx_export import export_embed_onnx
        from fewshot_studio.paths import user_cache_dir

        out = user_cache_dir() / "onnx" / f"{self.model_id.split(':')[0][:40]}.onnx"
        remove_stale_temps(out.parent)  # a killed export's or quantisation's temp files
        if not out.is_file():
            export_embed_onnx(copy.deepcopy(self.model), self.preprocess, out,
                              metadata=self.checkpoint_metadata)
            self.counters.extra["onnx_exports"] = self.counters.extra.get("onnx_exports", 0) + 1
        return out

    def int8_onnx_path(self) -> Path:
        """The int8 version of :meth:`onnx_path` (``<id>.int8.onnx`` beside it, or
        ``<id>.int8w7.onnx`` on CPUs that need 7-bit weights, see
        :func:`~fewshot_studio.engine.onnx_export.int8_weight_bits`; built once).
        Calibrated on :func:`~fewshot_studio.engine.onnx_export.synthetic_calibration`
        images, not on the session's images: it depends on the checkpoint only, like the
        cached features it computes."""
        from fewshot_studio.engine.onnx_export import (
            int8_variant,
            int8_weight_bits,
            quantize_embed_onnx,
            synthetic_calibration,
        )

        src = self.onnx_path()
        out = src.with_suffix(f".{int8_variant()}.onnx")
        if not out.is_file():
            quantize_embed_onnx(src, out, synthetic_calibration(self.preprocess),
                                weight_bits=int8_weight_bits())
            n = self.counters.extra.get("onnx_quantizations", 0)
            self.counters.extra["onnx_quantizations"] = n + 1
        return out

    def prepare(self) -> BackendInfo:
        """Build the backend now (export to ONNX, and quantise for int8, on first use);
        returns what runs. A backend built for another ``settings.precision`` is rebuilt."""
        if self._backend is not None and self._built_precision != self.settings.precision:
            self._backend.close()
            self._backend = None
        if self._backend is None:
            from fewshot_studio.engine.backends import torch_cuda_works

            model = self.model
            if self.settings.device != "cpu" and torch_cuda_works():
                model = copy.deepcopy(self.model)  # a CUDA copy must not move the head
            self._backend = select_backend(model, self.preprocess, self.onnx_path,
                                           self.settings.device, self._prefer,
                                           self.settings.precision, self.int8_onnx_path)
            self._built_precision = self.settings.precision
            self.backend = self._backend.info
        return self.backend

    def _feature_id(self) -> str:
        """The cache key of the features the backend computes: ``model_id``, plus ``:int8``
        (``:int8w7`` with 7-bit weights) when an int8 model computes them (they differ slightly
        from fp32's), plus ``:ttaN`` with N test-time views. Asking for int8 builds the backend
        first: whether int8 really runs is known only then."""
        if self.settings.precision != "fp32" or self._backend is not None:
            self.prepare()
        from fewshot_studio.engine.onnx_export import int8_variant

        int8 = self._backend is not None and self._backend.precision == "int8"
        views = self._tta_views()
        return (self.model_id + (f":{int8_variant()}" if int8 else "")
                + (f":tta{views}" if views > 1 else ""))

    def _tta_views(self) -> int:
        """Test-time views per image (1: none), see ``LabelSettings.tta``."""
        if not self.settings.tta:
            return 1
        kind = tta_kind(self.preprocess)
        return effective_views(TTA_VIEWS, kind)

    def _embed_arrays(self, x: np.ndarray) -> np.ndarray:
        """``(n, C, H, W)`` preprocessed float32 images -> ``(n, *feature_shape)`` features
        from the backend, averaged over the test-time views when ``settings.tta``."""
        assert self._backend is not None
        views = self._tta_views()
        if views <= 1:
            return self._backend.embed(x)
        backend = self._backend
        return embed_tta(lambda v: torch.from_numpy(backend.embed(v.numpy())),
                         torch.from_numpy(x), views, tta_kind(self.preprocess)).numpy()

    def _note_cache(self) -> None:
        """Copy the cache's state into the counters: its failures, why it is off, where a
        damaged file went (see :class:`~fewshot_studio.engine.cache.EmbeddingCache`)."""
        c = self._cache
        self.counters.cache_failures = c.failures
        self.counters.cache_disabled = c.disabled
        self.counters.cache_moved_aside = str(c.moved_aside or "")

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
            feats = self._embed_arrays(np.stack([results[j] for j in ok]))
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
        feature_id = self._feature_id()
        pending: deque[tuple[int, list[Any], list[FileKey | None]]] = deque()

        def submit(start: int) -> None:
            chunk = paths[start:start + bs]
            keys = file_keys(chunk)
            hits = self._cache.lookup(feature_id, [k for k in keys if k is not None])
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
                    feats = self._embed_arrays(np.stack([a for _, a in decoded]))
                    self.counters.embedded += len(decoded)
                    for (j, _), f in zip(decoded, feats, strict=True):
                        results[j] = f
                        k = keys[j]
                        assert k is not None
                        new_rows.append((k, f, ""))
                self._cache.store(feature_id, new_rows)
                self._note_cache()
                yield start, results
        finally:
            self._note_cache()
            for _, slots, _ in pending:
                for slot in slots:
                    if isinstance(slot, tuple):
                        slot[1].cancel()
