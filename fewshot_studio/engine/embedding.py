"""The embedding pipeline of a labeling session: image paths -> decode (a thread pool) ->
the embedding backend (ONNX Runtime or torch, see :mod:`.backends`) -> the SQLite feature
cache. Images stream in batches: the pool decodes the next batches while the backend embeds
the current one. A backend that declares ``decodes_on_device`` (torch on CUDA) gets its images
decoded onto its device instead (:class:`_DeviceDecoder`: reads in the pool, nvJPEG and the
resize in one thread on a side CUDA stream), with the same error rows."""

from __future__ import annotations

import copy
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fewshot_studio.data.gpu_decode import DecodedBatch, PendingBatch, finish_batch, start_batch
from fewshot_studio.data.images import ImageLoadError, load_and_preprocess
from fewshot_studio.data.preprocess import Preprocess
from fewshot_studio.data.tta import TTA_VIEWS, effective_views, embed_tta, tta_kind
from fewshot_studio.engine.api import BackendInfo, EngineCounters, LabelSettings
from fewshot_studio.engine.backends import (
    EmbedBackend,
    decode_workers,
    plan_backend,
    select_backend,
    torch_cuda_works,
)
from fewshot_studio.engine.cache import EmbeddingCache, FileKey, file_keys
from fewshot_studio.io.atomic import remove_stale_temps
from fewshot_studio.models.base import FewShotClassifier

Result = np.ndarray | str  # an image's feature, or why it has none
Decoded = np.ndarray | torch.Tensor  # a preprocessed (C, H, W) image, on the host or a device


def _decode_error(e: BaseException) -> str:
    if isinstance(e, ImageLoadError):
        return str(e) or "unreadable image"
    return f"unreadable image ({type(e).__name__}: {' '.join(str(e).split())[:160]})"


class _DeviceRows:
    """One batch's misses decoded onto a device: ``result()`` waits for the decode thread's
    :class:`~fewshot_studio.data.gpu_decode.DecodedBatch` (once) and gives, per file, its
    ``(C, S, S)`` image on the device or why it has none (``_decode_error``, as the pool's
    path says it). ``cancel()`` drops the decode if it has not started, and the reads."""

    def __init__(self, done: Future[DecodedBatch], pending: PendingBatch,
                 count: Callable[[str, int], None]) -> None:
        self._done, self._pending, self._count = done, pending, count
        self._rows: list[torch.Tensor | str] | None = None

    def result(self) -> list[torch.Tensor | str]:
        if self._rows is None:
            batch = self._done.result()
            images = batch.wait()
            self._count("nvjpeg_decoded", sum(batch.nvjpeg))
            self._rows = [images[i] if e is None else _decode_error(e)
                          for i, e in enumerate(batch.errors)]
        return self._rows

    def cancel(self) -> None:
        self._done.cancel()
        for f in self._pending.items:
            if isinstance(f, Future):
                f.cancel()


class _DeviceDecoder:
    """Decodes batches onto ``device`` for a backend that ``decodes_on_device``: the reads
    (and Pillow's decodes) in the pipeline's pool, submitted at once; the device work
    (:func:`~fewshot_studio.data.gpu_decode.finish_batch`) in one dedicated thread, never a
    pool worker (it waits on the pool), in order, on a side CUDA stream: batch k+1 decodes
    while the consumer embeds batch k on its own stream."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="fewshot-device-decode")
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def submit(self, paths: Sequence[str], pre: Preprocess, pool: ThreadPoolExecutor,
               count: Callable[[str, int], None]) -> _DeviceRows:
        pending = start_batch(paths, pre, self.device, pool)
        return _DeviceRows(self._thread.submit(finish_batch, pending, self._stream), pending,
                           count)

    def close(self) -> None:
        self._thread.shutdown(wait=True, cancel_futures=True)


def _stack(images: Sequence[Decoded]) -> Decoded:
    """``(C, H, W)`` images, all numpy or all tensors on one device -> ``(n, C, H, W)``."""
    if isinstance(images[0], torch.Tensor):
        return torch.stack(list(images))  # type: ignore[arg-type]
    return np.stack(images)  # type: ignore[arg-type]


@dataclass
class _Batch:
    """One batch in flight: ``slots[j]`` is a result (cache hit or stat error) or a pending
    ``(kind, future, position)``: "embedded" (decoded and embedded in a pool worker; the
    future's result is a list), "decoded" (decoded in the pool, embedded when collected) or
    "device" (a :class:`_DeviceRows`, the ``position``-th of its list; embedded when
    collected)."""

    start: int
    keys: list[FileKey | None]
    slots: list[Any] = field(default_factory=list)


class EmbeddingPipeline:
    """Paths -> cached features, for one checkpoint's ``model.embed``. Owns the decode pool,
    the backend (built lazily by :meth:`prepare`) and the cache; counts into ``counters``.

    ``settings``: what it reads of them is ``device``, ``precision``, ``batch_size`` and
    ``tta``; :meth:`configure` changes them. ``prefer``: "auto" | "onnxruntime" | "torch"."""

    def __init__(self, model: FewShotClassifier, preprocess: Preprocess,
                 checkpoint_metadata: dict[str, Any], model_id: str, cache: EmbeddingCache,
                 counters: EngineCounters, settings: LabelSettings, prefer: str) -> None:
        self.model = model
        self.preprocess = preprocess
        self.checkpoint_metadata = checkpoint_metadata
        self.model_id = model_id
        self.cache = cache
        self.counters = counters
        self.settings = settings
        self.prefer = prefer
        self.embedder: EmbedBackend | None = None  # built by prepare()
        self._built_precision = ""  # settings.precision the backend was built for
        self._pool: ThreadPoolExecutor | None = None
        self._device: _DeviceDecoder | None = None  # for a backend that decodes_on_device
        self.note_cache()

    @property
    def backend(self) -> BackendInfo:
        """What runs: the built backend's info, or before :meth:`prepare` what will
        (:func:`~fewshot_studio.engine.backends.plan_backend`, detail "not started")."""
        if self.embedder is not None:
            return self.embedder.info
        return plan_backend(self.settings.device, self.prefer,
                            self.model.embed_is_identity).info()

    def configure(self, settings: LabelSettings) -> None:
        """New settings; a new device or precision drops the backend (rebuilt on next use)."""
        old, self.settings = self.settings, settings
        if (settings.device != old.device or settings.precision != old.precision) \
                and self.embedder is not None:
            self.embedder.close()
            self.embedder = None

    def use_model(self, model: FewShotClassifier, model_id: str, prefer: str) -> None:
        """Embed with ``model`` from now on, its features cached under ``model_id`` (the
        session's fine-tuned copy, and back); a new model drops the backend."""
        if model is self.model and model_id == self.model_id:
            return
        if self.embedder is not None:
            self.embedder.close()
            self.embedder = None
        self.model, self.model_id, self.prefer = model, model_id, prefer

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
            self._count("onnx_exports")
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
            self._count("onnx_quantizations")
        return out

    def prepare(self) -> BackendInfo:
        """Build the backend now (export to ONNX, and quantise for int8, on first use);
        returns what runs. A backend built for another ``settings.precision`` is rebuilt."""
        if self.embedder is not None and self._built_precision != self.settings.precision:
            self.embedder.close()
            self.embedder = None
        if self.embedder is None:
            model = self.model
            if self.settings.device != "cpu" and torch_cuda_works():
                model = copy.deepcopy(self.model)  # a CUDA copy must not move the head
            self.embedder = select_backend(model, self.preprocess, self.onnx_path,
                                           self.settings.device, self.prefer,
                                           self.settings.precision, self.int8_onnx_path)
            self._built_precision = self.settings.precision
        return self.embedder.info

    def feature_id(self) -> str:
        """The cache key of the features the backend computes: ``model_id``, plus ``:int8``
        (``:int8w7`` with 7-bit weights) when an int8 model computes them (they differ slightly
        from fp32's), plus ``:ttaN`` with N test-time views. Asking for int8 builds the backend
        first: whether int8 really runs is known only then."""
        if self.settings.precision != "fp32" or self.embedder is not None:
            self.prepare()
        from fewshot_studio.engine.onnx_export import int8_variant

        int8 = self.embedder is not None and self.embedder.precision == "int8"
        views = self._tta_views()
        return (self.model_id + (f":{int8_variant()}" if int8 else "")
                + (f":tta{views}" if views > 1 else ""))

    def _tta_views(self) -> int:
        """Test-time views per image (1: none), see ``LabelSettings.tta``."""
        if not self.settings.tta:
            return 1
        return effective_views(TTA_VIEWS, tta_kind(self.preprocess))

    def embed_arrays(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        """``(n, C, H, W)`` preprocessed float32 images (numpy, or a tensor on the device of
        a backend that ``decodes_on_device``) -> ``(n, *feature_shape)`` numpy features from
        the backend, averaged over the test-time views when ``settings.tta``."""
        backend = self.embedder
        assert backend is not None
        views = self._tta_views()
        if views <= 1:
            return backend.embed(x) if isinstance(x, np.ndarray) else backend.embed_tensor(x)
        t = torch.from_numpy(x) if isinstance(x, np.ndarray) else x
        return embed_tta(lambda v: torch.from_numpy(backend.embed_tensor(v)), t, views,
                         tta_kind(self.preprocess)).numpy()

    def note_cache(self) -> None:
        """Copy the cache's state into the counters: its failures, why it is off, where a
        damaged file went (see :class:`~fewshot_studio.engine.cache.EmbeddingCache`)."""
        c = self.cache
        self.counters.cache_failures = c.failures
        self.counters.cache_disabled = c.disabled
        self.counters.cache_moved_aside = str(c.moved_aside or "")

    def _count(self, name: str, n: int = 1) -> None:
        self.counters.extra[name] = self.counters.extra.get(name, 0) + n

    def decode(self, path: str) -> Result:
        """``path`` -> its ``(C, H, W)`` preprocessed float32 image, or why it has none."""
        try:
            return load_and_preprocess(path, self.preprocess)
        except Exception as e:
            return _decode_error(e)

    def _get_pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(decode_workers(), thread_name_prefix="fewshot-decode")
        return self._pool

    def _device_decoder(self, device: torch.device) -> _DeviceDecoder:
        """The decoder onto ``device`` (a new one when the backend's device changed)."""
        if self._device is not None and self._device.device != device:
            self._device.close()
            self._device = None
        if self._device is None:
            self._device = _DeviceDecoder(device)
        return self._device

    def _decode_embed(self, paths: Sequence[str]) -> list[Result]:
        """Decode and embed a micro-batch in a pool worker (backends that run concurrently:
        ONNX Runtime on the CPU with one thread per call)."""
        results: list[Result] = [self.decode(p) for p in paths]
        ok = [j for j, r in enumerate(results) if not isinstance(r, str)]
        if ok:
            feats = self.embed_arrays(np.stack([results[j] for j in ok]))
            for j, f in zip(ok, feats, strict=True):
                results[j] = f
        return results

    def _lookup(self, feature_id: str, chunk: Sequence[Path]) -> tuple[_Batch, list[int]]:
        """A batch of ``chunk`` with its cache hits and stat errors filled in, and the
        positions of its misses."""
        keys = file_keys(chunk)
        hits = self.cache.lookup(feature_id, [k for k in keys if k is not None])
        batch = _Batch(0, keys)
        misses: list[int] = []
        for p, k in zip(chunk, keys, strict=True):
            if k is None:
                batch.slots.append("file not found" if not os.path.lexists(p)
                                   else "cannot read file")
                continue
            e = hits.get(k.path)
            if e is not None:
                self.counters.cache_hits += 1
                batch.slots.append(e.feature if e.feature is not None else e.error)
            else:
                misses.append(len(batch.slots))
                batch.slots.append(None)
        return batch, misses

    def _submit(self, feature_id: str, paths: Sequence[Path], start: int) -> _Batch:
        """Start batch ``paths[start:start + batch_size]``: cache lookups now; misses go to
        the pool, decoded and embedded together by micro-batches with a concurrent backend
        (ONNX Runtime on the CPU), decoded onto the device for a backend that
        ``decodes_on_device`` (:class:`_DeviceDecoder`), else decoded only (embedded in
        :meth:`_collect`)."""
        bs = self._batch_size()
        batch, misses = self._lookup(feature_id, paths[start:start + bs])
        batch.start = start
        if not misses:
            return batch
        self.prepare()
        backend = self.embedder
        assert backend is not None
        pool = self._get_pool()
        paths_of = [k.path if k is not None else "" for k in batch.keys]
        if backend.decodes_on_device:
            rows = self._device_decoder(backend.device).submit(
                [paths_of[j] for j in misses], self.preprocess, pool, self._count)
            for pos, j in enumerate(misses):
                batch.slots[j] = ("device", rows, pos)
        elif backend.concurrent:
            m = backend.micro_batch
            for c0 in range(0, len(misses), m):
                group = misses[c0:c0 + m]
                fut: Future[Any] = pool.submit(self._decode_embed, [paths_of[j] for j in group])
                for pos, j in enumerate(group):
                    batch.slots[j] = ("embedded", fut, pos)
        else:
            for j in misses:
                batch.slots[j] = ("decoded", pool.submit(self.decode, paths_of[j]), 0)
        return batch

    def _collect(self, batch: _Batch) -> tuple[list[Result],
                                               list[tuple[FileKey, np.ndarray | None, str]]]:
        """Wait for a batch: its results in order and the new cache rows."""
        decoded: list[tuple[int, Decoded]] = []
        results: list[Result] = []
        new_rows: list[tuple[FileKey, np.ndarray | None, str]] = []
        for j, slot in enumerate(batch.slots):
            if not isinstance(slot, tuple):
                results.append(slot)  # cache hit or stat error
                continue
            kind, fut, pos = slot
            r = fut.result() if kind == "decoded" else fut.result()[pos]
            k = batch.keys[j]
            assert k is not None
            if isinstance(r, str):
                self._count("decode_errors")
                new_rows.append((k, None, r))
            elif kind == "embedded":
                self.counters.embedded += 1
                new_rows.append((k, r, ""))
            else:
                decoded.append((j, r))
            results.append(r)
        if decoded:
            feats = self.embed_arrays(_stack([a for _, a in decoded]))
            self.counters.embedded += len(decoded)
            for (j, _), f in zip(decoded, feats, strict=True):
                results[j] = f
                k = batch.keys[j]
                assert k is not None
                new_rows.append((k, f, ""))
        return results, new_rows

    def _batch_size(self) -> int:
        return max(1, int(self.settings.batch_size))

    def stream(self, paths: Sequence[Path], prefetch: int = 2
               ) -> Iterator[tuple[int, list[Result]]]:
        """Features (or error reasons) of ``paths`` in order, by batch of
        ``settings.batch_size``: yields ``(offset, results)``.

        Cache first; misses are decoded and embedded (:meth:`_submit`, :meth:`_collect`).
        ``prefetch`` batches are in flight ahead of the one being collected, which bounds
        memory. New results go to the cache."""
        starts = iter(range(0, len(paths), self._batch_size()))
        feature_id = self.feature_id()
        pending: deque[_Batch] = deque()
        try:
            for s in starts:
                pending.append(self._submit(feature_id, paths, s))
                if len(pending) > prefetch:
                    break
            while pending:
                batch = pending.popleft()
                nxt = next(starts, None)
                if nxt is not None:
                    pending.append(self._submit(feature_id, paths, nxt))
                results, new_rows = self._collect(batch)
                self.cache.store(feature_id, new_rows)
                self.note_cache()
                yield batch.start, results
        finally:
            self.note_cache()
            for batch in pending:
                for slot in batch.slots:
                    if isinstance(slot, tuple):
                        slot[1].cancel()

    def close(self) -> None:
        """Stop the device decoder and the pool, release the backend, close the cache."""
        if self._device is not None:
            self._device.close()
            self._device = None
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self.embedder is not None:
            self.embedder.close()
            self.embedder = None
        self.cache.close()
