"""Embedding backends: run ``model.embed`` on batches of preprocessed images.

* :class:`OnnxBackend`: ONNX Runtime on an export of ``model.embed`` (built on first use and
  cached by checkpoint identity; for an imported ONNX backbone, its own graph composed with
  the method's pooling: :func:`~fewshot_studio.engine.onnx_export.embedded_graph`). CUDA
  only when the created session really lists ``CUDAExecutionProvider``.
* :class:`TorchBackend`: the torch model itself (CUDA when it really works). On CUDA it
  declares ``decodes_on_device``: the pipeline then decodes its images onto the GPU
  (:mod:`fewshot_studio.data.gpu_decode`, nvJPEG for plain JPEGs, Pillow for the rest).
* :class:`IdentityBackend`: methods that declare ``embed_is_identity`` (full MAML): the
  preprocessed image is the feature.

:data:`BACKEND_SPECS` is the one table of backends; :func:`plan_backend` the one decision
(the session shows it before anything is built); :func:`select_backend` builds it, for
``device`` "auto" | "cpu" | "cuda", ``prefer`` "auto" | "onnxruntime" | "torch" and
``precision`` "fp32" | "int8" (int8: ONNX Runtime on the CPU runs a statically quantised
export, see :func:`~fewshot_studio.engine.onnx_export.quantize_embed_onnx`). All backends map
``(n, C, H, W)`` float32 numpy arrays to ``(n, *feature_shape)`` float32 numpy arrays.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fewshot_studio.data.preprocess import Preprocess
from fewshot_studio.engine.api import BackendInfo
from fewshot_studio.errors import UserError
from fewshot_studio.models.backbones.onnx_graph import fixed_batch, run_batched
from fewshot_studio.models.base import FewShotClassifier

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "int8")


class EmbedBackend:
    """Base: ``embed((n, C, H, W) float32) -> (n, *feature_shape) float32``.

    ``decodes_on_device``: the backend declares that it takes its images as tensors on
    ``device`` (:meth:`embed_tensor`): the embedding pipeline then decodes them there
    (:func:`~fewshot_studio.data.gpu_decode.start_batch` /
    :func:`~fewshot_studio.data.gpu_decode.finish_batch`) instead of into numpy arrays."""

    info: BackendInfo
    concurrent: bool = False  # embed() may run in several pool workers at once
    micro_batch: int = 0  # images per embed() call when concurrent
    precision: str = "fp32"  # "int8": a quantised model (features differ slightly from fp32)
    decodes_on_device: bool = False
    device: torch.device = torch.device("cpu")

    def embed(self, images: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def embed_tensor(self, images: torch.Tensor) -> np.ndarray:
        """``embed`` of a float32 ``(n, C, H, W)`` tensor (on ``device`` for a backend that
        ``decodes_on_device``) -> ``(n, *feature_shape)`` float32 numpy features."""
        return self.embed(images.cpu().numpy())

    def close(self) -> None:
        """Release resources."""


class TorchBackend(EmbedBackend):
    """The torch model on ``device``; on CUDA it ``decodes_on_device`` (the detail says
    whether nvJPEG or only Pillow decodes there). Inputs stay float32 and contiguous: bf16
    and channels_last wait for a parity check of the features on a GPU."""

    def __init__(self, model: nn.Module, device: str = "cpu") -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        detail = ""
        if self.device.type == "cuda":
            from fewshot_studio.data.gpu_decode import nvjpeg_decoder

            detail = torch.cuda.get_device_name(self.device) + (
                "; JPEG decode: nvJPEG" if nvjpeg_decoder(str(self.device)) is not None
                else "; decode: Pillow (no torchvision nvJPEG)")
        self.info = BackendInfo("torch", self.device.type, detail)

    @property
    def decodes_on_device(self) -> bool:  # type: ignore[override]
        return self.device.type == "cuda"

    def embed(self, images: np.ndarray) -> np.ndarray:
        return self.embed_tensor(torch.from_numpy(np.ascontiguousarray(images,
                                                                       dtype=np.float32)))

    def embed_tensor(self, images: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            out = self.model.embed(images.to(self.device, non_blocking=True))
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
        self._fixed = fixed_batch(self.session)  # an imported graph may fix its batch size
        self.precision = precision
        detail = ", ".join(active) + (", int8" if precision == "int8" else "")
        if self.concurrent:
            detail += f"; {decode_workers()} parallel workers x 1 thread"
        self.info = BackendInfo("onnxruntime", real_device, detail)

    def embed(self, images: np.ndarray) -> np.ndarray:
        x = np.asarray(images, dtype=np.float32)
        out = run_batched(lambda c: self.session.run([self._out], {self._in: c})[0], x,
                          self._fixed)
        return np.asarray(out, dtype=np.float32)

    def close(self) -> None:
        self.session = None


class IdentityBackend(EmbedBackend):
    """For methods whose features are the preprocessed images themselves (they declare
    ``embed_is_identity``)."""

    INFO = BackendInfo("torch", "cpu", "embed is the identity (preprocessed image)")

    def __init__(self) -> None:
        self.info = self.INFO

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


IDENTITY = "identity"  # the plan of a method that declares ``embed_is_identity``


@dataclass(frozen=True)
class BackendRequest:
    """What a backend is built for: the model, its preprocessing, the paths of its ONNX
    exports (called only when ONNX Runtime runs) and the user's choices."""

    model: FewShotClassifier
    pre: Preprocess
    onnx_path: Callable[[], Path]
    int8_path: Callable[[], Path] | None
    device: str
    prefer: str
    precision: str


@dataclass(frozen=True)
class BackendSpec:
    """One row of :data:`BACKEND_SPECS`. ``installed()`` / ``cuda_works()``: whether it can
    run, and on CUDA; ``auto_on_cuda``: ``prefer="auto"`` tries it first on CUDA (the others
    first on the CPU); ``fallback``: what an explicit preference for it falls back to when it
    is not installed or, for CUDA, has none; ``build(request, device)``."""

    name: str
    installed: Callable[[], bool]
    cuda_works: Callable[[], bool]
    auto_on_cuda: bool
    fallback: str | None
    build: Callable[[BackendRequest, str], EmbedBackend]


@dataclass(frozen=True)
class BackendPlan:
    """What :func:`plan_backend` decided: ``name`` (a :data:`BACKEND_NAMES` entry or
    :data:`IDENTITY`) on ``device`` "cpu" | "cuda"."""

    name: str
    device: str

    def info(self) -> BackendInfo:
        """What will run, before the backend is built."""
        if self.name == IDENTITY:
            return IdentityBackend.INFO
        return BackendInfo(self.name, self.device, "not started")


def _ort_installed() -> bool:
    return bool(onnxruntime_providers())


def _ort_cuda() -> bool:
    return "CUDAExecutionProvider" in onnxruntime_providers()


def _torch_cuda() -> bool:
    return torch_cuda_works()


def _always() -> bool:
    return True


def _build_torch(req: BackendRequest, device: str) -> EmbedBackend:
    return TorchBackend(req.model, device)


def _build_onnx(req: BackendRequest, device: str) -> EmbedBackend:
    """ONNX Runtime: the int8 export on the CPU when asked (fp32, with a logged warning, if
    it fails); an export or session failure falls back to torch (logged) unless ONNX Runtime
    was asked for; a session that did not start its CUDA provider gives way to torch on CUDA
    when that works (UserError for ``device="cuda"`` otherwise)."""
    input_bytes = 4 * req.pre.channels * req.pre.image_size ** 2
    if req.precision == "int8" and device == "cpu" and req.int8_path is not None:
        try:
            return OnnxBackend(req.int8_path(), "cpu", input_bytes=input_bytes, precision="int8")
        except Exception as e:
            log.warning("int8 model unavailable for this checkpoint (%s: %s); using fp32",
                        type(e).__name__, e)
    torch_device = "cuda" if device == "cuda" and torch_cuda_works() else "cpu"
    try:
        backend = OnnxBackend(req.onnx_path(), device, input_bytes=input_bytes)
    except Exception as e:
        if req.prefer == "onnxruntime":
            raise
        log.warning("ONNX Runtime unavailable for this checkpoint (%s); using torch", e)
        return TorchBackend(req.model, torch_device)
    if device == "cuda" and backend.info.device != "cuda":
        # CUDA provider listed as available but not active in the session: say so, and
        # use torch CUDA instead when that works.
        if torch_device == "cuda":
            backend.close()
            return TorchBackend(req.model, "cuda")
        if req.device == "cuda":
            raise UserError("--device cuda: onnxruntime could not start its CUDA provider")
    return backend


BACKEND_SPECS: tuple[BackendSpec, ...] = (
    BackendSpec("onnxruntime", _ort_installed, _ort_cuda, auto_on_cuda=False,
                fallback="torch", build=_build_onnx),
    BackendSpec("torch", _always, _torch_cuda, auto_on_cuda=True, fallback=None,
                build=_build_torch),
)
"""The embedding backends, in the order ``prefer="auto"`` tries them on the CPU (on CUDA
those with ``auto_on_cuda`` come first): the one table :func:`plan_backend` reads."""
BACKEND_NAMES: tuple[str, ...] = tuple(s.name for s in BACKEND_SPECS)
"""Backends a user can ask for, besides "auto" (the CLI's ``--backend`` choices)."""
BACKENDS = ("auto", *BACKEND_NAMES)
_SPEC = {s.name: s for s in BACKEND_SPECS}


def cuda_available() -> bool:
    """Whether some installed backend really runs on CUDA."""
    return any(s.installed() and s.cuda_works() for s in BACKEND_SPECS)


def _candidates(prefer: str, cuda: bool) -> list[BackendSpec]:
    """The specs ``prefer`` may use, in order: "auto": every one (``auto_on_cuda`` first on
    CUDA); a name: it, then its fallbacks; an unknown name (rejected by
    :func:`check_request` before anything is built) is read as "auto"."""
    if prefer not in _SPEC:
        return sorted(BACKEND_SPECS, key=lambda s: s.auto_on_cuda != cuda)
    out: list[BackendSpec] = []
    name: str | None = prefer
    while name is not None:
        out.append(_SPEC[name])
        name = _SPEC[name].fallback
    return out


def plan_backend(device: str, prefer: str, identity: bool = False) -> BackendPlan:
    """The one backend decision (:func:`select_backend` builds it; the session shows it before
    building). ``identity``: the model declares ``embed_is_identity`` (no backend runs).
    CUDA is wanted for ``device="cuda"``, or "auto" when some backend really has it: then the
    first candidate (:func:`_candidates`) whose CUDA works; else the first installed one, on
    the CPU. Raises nothing (:func:`check_runnable` says what cannot run)."""
    if identity:
        return BackendPlan(IDENTITY, "cpu")
    want_cuda = device == "cuda" or (device == "auto" and cuda_available())
    if want_cuda:
        for spec in _candidates(prefer, cuda=True):
            if spec.installed() and spec.cuda_works():
                return BackendPlan(spec.name, "cuda")
    spec = next(s for s in _candidates(prefer, cuda=False) if s.installed())
    return BackendPlan(spec.name, "cpu")


def check_request(device: str, prefer: str, precision: str) -> None:
    """UserError for an unknown device, backend or precision."""
    if device not in DEVICES:
        raise UserError(f"unknown device {device!r} (choose from {', '.join(DEVICES)})")
    if prefer not in BACKENDS:
        raise UserError(f"unknown backend {prefer!r} (choose from {', '.join(BACKENDS)})")
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r} "
                        f"(choose from {', '.join(PRECISIONS)})")


def check_runnable(device: str, prefer: str) -> None:
    """UserError for a request that cannot run here: ``device="cuda"`` without a working
    CUDA (in the backend asked for), or a backend asked for that is not installed."""
    if device == "cuda" and not cuda_available():
        raise UserError("--device cuda: no working CUDA (torch has none and onnxruntime-gpu "
                        "is not installed)")
    if prefer != "auto" and not _SPEC[prefer].installed():
        raise UserError(f"the {prefer} backend was asked for but {prefer} is not "
                        f"installed (pip install {prefer})")
    if device == "cuda" and plan_backend(device, prefer).device != "cuda":
        raise UserError(f"--device cuda: {prefer} has no working CUDA")


def select_backend(model: FewShotClassifier, pre: Preprocess, onnx_path: Callable[[], Path],
                   device: str = "auto", prefer: str = "auto", precision: str = "fp32",
                   int8_path: Callable[[], Path] | None = None) -> EmbedBackend:
    """Choose (:func:`check_request`, :func:`plan_backend`) and build a backend.

    ``device``: "auto" (CUDA when it really works, else CPU), "cpu" or "cuda" (UserError if
    CUDA does not work). ``prefer``: "auto" (torch on a working CUDA, else ONNX Runtime:
    ONNX Runtime with CUDA when torch has no CUDA but onnxruntime-gpu does; ONNX Runtime on the
    CPU), "onnxruntime" or "torch". ``onnx_path()`` exports (or finds) the ONNX file; it is
    only called when ONNX Runtime is used. An ONNX export or session failure falls back to
    torch with a logged warning. ``precision`` "int8": ONNX Runtime on the CPU runs the file
    ``int8_path()`` quantises (or finds); a quantisation or session failure falls back to
    fp32 with a logged warning. Elsewhere (torch, CUDA) ``precision`` is ignored: the
    backend's ``precision`` says what runs. A model that declares ``embed_is_identity`` gets
    the :class:`IdentityBackend`.
    """
    check_request(device, prefer, precision)
    model = model.eval()
    if model.embed_is_identity:
        return IdentityBackend()
    check_runnable(device, prefer)
    plan = plan_backend(device, prefer)
    request = BackendRequest(model, pre, onnx_path, int8_path, device, prefer, precision)
    return _SPEC[plan.name].build(request, plan.device)
