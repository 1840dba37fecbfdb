"""Embedding backends: run ``model.embed`` on batches of preprocessed images.

* :class:`OnnxBackend`: ONNX Runtime on an export of ``model.embed`` (built on first use and
  cached by checkpoint identity). CUDA only when the created session really lists
  ``CUDAExecutionProvider``.
* :class:`TorchBackend`: the torch model itself (CUDA when it really works).
* :class:`IdentityBackend`: methods whose ``embed`` is the identity (full MAML): the
  preprocessed image is the feature.

:func:`select_backend` picks one for ``device`` "auto" | "cpu" | "cuda", ``prefer``
"auto" | "onnxruntime" | "torch" and ``precision`` "fp32" | "int8" (int8: ONNX Runtime on the
CPU runs a statically quantised export, see
:func:`~fewshot_studio.engine.onnx_export.quantize_embed_onnx`). All backends map
``(n, C, H, W)`` float32 numpy arrays to ``(n, *feature_shape)`` float32 numpy arrays.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fewshot_studio.data.preprocess import Preprocess
from fewshot_studio.engine.api import BackendInfo
from fewshot_studio.errors import UserError

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
BACKENDS = ("auto", "onnxruntime", "torch")
PRECISIONS = ("fp32", "int8")


class EmbedBackend:
    """Base: ``embed((n, C, H, W) float32) -> (n, *feature_shape) float32``."""

    info: BackendInfo
    concurrent: bool = False  # embed() may run in several pool workers at once
    micro_batch: int = 0  # images per embed() call when concurrent
    precision: str = "fp32"  # "int8": a quantised model (features differ slightly from fp32)

    def embed(self, images: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        """Release resources."""


class TorchBackend(EmbedBackend):
    def __init__(self, model: nn.Module, device: str = "cpu") -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        detail = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else ""
        self.info = BackendInfo("torch", self.device.type, detail)

    def embed(self, images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
        with torch.inference_mode():
            out = self.model.embed(x.to(self.device, non_blocking=True))
        return out.float().cpu().numpy()


class OnnxBackend(EmbedBackend):
    """ONNX Runtime. On the CPU the session runs one thread per call and is called from
    every pool worker at once (each decodes and embeds its own micro-batch): no
    oversubscription on small machines, and small batches keep activations in cache."""

    def __init__(self, onnx_path: str | os.PathLike[str], device: str = "cpu",
                 threads: int | None = None, input_bytes: int = 0,
                 precision: str = "fp32") -> None:
        from fewshot_studio.engine.onnx_export import INPUT_NAME, OUTPUT_NAME, onnx_session

        self._in, self._out = INPUT_NAME, OUTPUT_NAME
        providers = ["CPUExecutionProvider"]
        if device == "cuda":
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        cpu = device != "cuda"
        self.session = onnx_session(onnx_path, providers, threads or (1 if cpu else None))
        active = self.session.get_providers()
        real_device = "cuda" if "CUDAExecutionProvider" in active else "cpu"
        self.concurrent = real_device == "cpu" and (threads or 1) == 1
        # Small calls keep activations in cache: ~256 KB of input per call (3 images at
        # 84 px RGB, 1 at 224 px). Measured in CPU time per image with one thread, Conv4 at
        # 84 px: 1.86 ms at batch 1, 2.05 ms at 8; Lite0 at 224 px: 11.1 ms vs 14.0 ms.
        self.micro_batch = max(1, min(16, (256 << 10) // input_bytes)) if input_bytes else 4
        self.precision = precision
        detail = ", ".join(active) + (", int8" if precision == "int8" else "")
        if self.concurrent:
            detail += f"; {decode_workers()} parallel workers x 1 thread"
        self.info = BackendInfo("onnxruntime", real_device, detail)

    def embed(self, images: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(images, dtype=np.float32)
        return np.asarray(self.session.run([self._out], {self._in: x})[0], dtype=np.float32)

    def close(self) -> None:
        self.session = None


class IdentityBackend(EmbedBackend):
    """For methods whose features are the preprocessed images themselves."""

    def __init__(self) -> None:
        self.info = BackendInfo("torch", "cpu", "embed is the identity (preprocessed image)")

    def embed(self, images: np.ndarray) -> np.ndarray:
        return np.asarray(images, dtype=np.float32)


def decode_workers() -> int:
    """Pool size of the engine's decode workers."""
    return max(1, min(8, os.cpu_count() or 1))


@lru_cache(maxsize=1)
def torch_cuda_works() -> bool:
    """True when torch can really run a CUDA kernel (not merely built with CUDA)."""
    try:
        if not torch.cuda.is_available():
            return False
        x = torch.ones(8, device="cuda")
        return float((x * 2).sum().item()) == 16.0
    except Exception:  # pragma: no cover - depends on the machine
        return False


def onnxruntime_providers() -> list[str]:
    """ONNX Runtime's available providers ([] when it is not installed)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return []
    return list(ort.get_available_providers())


IDENTITY_PROBE_SIZE = 32
"""Side of the image :func:`embed_is_identity` probes with (capped by the model's own size):
identity does not depend on the input size, and a real-size probe through a large model
would cost as much memory as embedding a batch."""


def embed_is_identity(model: nn.Module, pre: Preprocess) -> bool:
    """Whether ``model.embed`` returns its input unchanged (full MAML). Probes one small
    image (``IDENTITY_PROBE_SIZE`` px at most); a model that cannot embed so small an image
    is not the identity."""
    s = min(pre.image_size, IDENTITY_PROBE_SIZE)
    x = torch.randn(1, pre.channels, s, s, generator=torch.Generator().manual_seed(0))
    try:
        with torch.inference_mode():
            y = model.embed(x)
    except Exception:  # e.g. too small for the backbone's poolings: it computes something
        return False
    return y is x or (y.shape == x.shape and torch.equal(y, x))


def select_backend(model: nn.Module, pre: Preprocess, onnx_path: Callable[[], Path],
                   device: str = "auto", prefer: str = "auto", precision: str = "fp32",
                   int8_path: Callable[[], Path] | None = None) -> EmbedBackend:
    """Choose and build a backend.

    ``device``: "auto" (CUDA when it really works, else CPU), "cpu" or "cuda" (UserError if
    CUDA does not work). ``prefer``: "auto" (torch on a working CUDA, else ONNX Runtime:
    ONNX Runtime with CUDA when torch has no CUDA but onnxruntime-gpu does; ONNX Runtime on the
    CPU), "onnxruntime" or "torch". ``onnx_path()`` exports (or finds) the ONNX file; it is
    only called when ONNX Runtime is used. An ONNX export or session failure falls back to
    torch with a logged warning. ``precision`` "int8": ONNX Runtime on the CPU runs the file
    ``int8_path()`` quantises (or finds); a quantisation or session failure falls back to
    fp32 with a logged warning. Elsewhere (torch, CUDA) ``precision`` is ignored: the
    backend's ``precision`` says what runs.
    """
    if device not in DEVICES:
        raise UserError(f"unknown device {device!r} (choose from {', '.join(DEVICES)})")
    if prefer not in BACKENDS:
        raise UserError(f"unknown backend {prefer!r} (choose from {', '.join(BACKENDS)})")
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r} "
                        f"(choose from {', '.join(PRECISIONS)})")
    model = model.eval()
    if embed_is_identity(model, pre):
        return IdentityBackend()
    has_ort = bool(onnxruntime_providers())
    ort_cuda = "CUDAExecutionProvider" in onnxruntime_providers()
    cuda_torch = torch_cuda_works()
    if device == "cuda" and not (cuda_torch or ort_cuda):
        raise UserError("--device cuda: no working CUDA (torch has none and onnxruntime-gpu "
                        "is not installed)")
    want_cuda = device == "cuda" or (device == "auto" and (cuda_torch or ort_cuda))

    if prefer == "torch" or not has_ort:
        if device == "cuda" and not cuda_torch:
            raise UserError("--device cuda: torch has no working CUDA")
        if prefer == "onnxruntime":
            raise UserError("the onnxruntime backend was asked for but onnxruntime is not "
                            "installed (pip install onnxruntime)")
        return TorchBackend(model, "cuda" if want_cuda and cuda_torch else "cpu")

    if prefer == "auto" and want_cuda and cuda_torch:
        return TorchBackend(model, "cuda")
    ort_device = "cuda" if want_cuda and ort_cuda else "cpu"
    input_bytes = 4 * pre.channels * pre.image_size ** 2
    if precision == "int8" and ort_device == "cpu" and int8_path is not None:
        try:
            return OnnxBackend(int8_path(), "cpu", input_bytes=input_bytes, precision="int8")
        except Exception as e:
            log.warning("int8 model unavailable for this checkpoint (%s: %s); using fp32",
                        type(e).__name__, e)
    try:
        backend = OnnxBackend(onnx_path(), ort_device, input_bytes=input_bytes)
    except Exception as e:
        if prefer == "onnxruntime":
            raise
        log.warning("ONNX Runtime unavailable for this checkpoint (%s); using torch", e)
        return TorchBackend(model, "cuda" if want_cuda and cuda_torch else "cpu")
    if want_cuda and backend.info.device != "cuda":
        # CUDA provider listed as available but not active in the session: say so, and
        # use torch CUDA instead when that works.
        if cuda_torch:
            backend.close()
            return TorchBackend(model, "cuda")
        if device == "cuda":
            raise UserError("--device cuda: onnxruntime could not start its CUDA provider")
    return backend
