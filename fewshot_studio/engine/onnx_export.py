"""Export a checkpoint's support-independent part (``model.embed``) to ONNX, and check the
export against torch.

The graph maps ``images`` ``(n, C, H, W)`` float32 (preprocessed: resized and normalised as
the checkpoint's :class:`~fewshot_studio.data.preprocess.Preprocess` says) to ``features``
``(n, *feature_shape)`` float32, with a dynamic batch axis. The checkpoint's metadata and
preprocessing travel in the ONNX model's ``metadata_props``.

:func:`quantize_embed_onnx` derives a static int8 version of that graph (same input and
output, float32) for ONNX Runtime on the CPU. Its weights are 8-bit where the CPU multiplies
uint8 by int8 exactly (VNNI, or not x86), else 7-bit (:func:`int8_weight_bits`).
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import os
import platform
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fewshot_studio.data.preprocess import Preprocess
from fewshot_studio.errors import UserError
from fewshot_studio.io.atomic import atomic_path

OPSET = 18
INPUT_NAME = "images"
OUTPUT_NAME = "features"
PARITY_TOLERANCE = 1e-4


class _Embed(nn.Module):
    """``model.embed`` as a module's forward (what the exporter traces)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> Tensor:
        return self.model.embed(images)


def example_input(pre: Preprocess, n: int = 2, seed: int = 0) -> Tensor:
    """``(n, C, H, W)`` float32 random input shaped like the checkpoint's preprocessed images."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, pre.channels, pre.image_size, pre.image_size, generator=g)


@contextlib.contextmanager
def _quiet() -> Any:
    """Silence the exporters' prints, warnings and log lines."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels, strict=True):
            lg.setLevel(lv)


def _export_dynamo(module: nn.Module, x: Tensor, path: str) -> None:
    batch = torch.export.Dim("batch", min=1, max=65536)
    torch.onnx.export(module, (x,), path, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                      dynamic_shapes=({0: batch},), dynamo=True, opset_version=OPSET,
                      external_data=False, verbose=False)


def _export_legacy(module: nn.Module, x: Tensor, path: str) -> None:
    torch.onnx.export(module, (x,), path, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                      dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                      dynamo=False, opset_version=OPSET)


def embedded_graph(model: nn.Module) -> bytes | None:
    """The ready ONNX graph of ``model.embed`` when its backbone declares that it carries one
    (an imported ONNX model, :class:`~fewshot_studio.models.backbones.onnx_graph.OnnxGraph`):
    that graph composed with the method's pooling (ProtoNet, the only method
    ``import-backbone`` builds; UserError for another). None: ``model.embed`` is exported."""
    from fewshot_studio.models.backbones.onnx_graph import OnnxGraph
    from fewshot_studio.models.protonet import ProtoNet

    backbone = model.backbone
    if not isinstance(backbone, OnnxGraph):
        return None
    if not isinstance(model, ProtoNet):
        raise UserError(f"an ONNX backbone runs under ProtoNet only, not "
                        f"{type(model).__name__}")
    return backbone.embed_graph(model.pool, INPUT_NAME, OUTPUT_NAME)


def _export_traced(model: nn.Module, pre: Preprocess, tmp: str) -> None:
    """Trace ``model.embed`` to ``tmp``: the TorchScript-based exporter first, then the
    torch.export-based one."""
    module = _Embed(model).eval()
    x = example_input(pre, 2)
    errors = []
    for exporter in (_export_legacy, _export_dynamo):
        try:
            with _quiet(), torch.no_grad():
                exporter(module, x, tmp)
            return
        except Exception as e:  # pragma: no cover - depends on the torch version
            errors.append(f"{exporter.__name__}: {type(e).__name__}: {e}")
    raise RuntimeError("ONNX export failed: " + " | ".join(errors))


def export_embed_onnx(model: nn.Module, pre: Preprocess, out: str | os.PathLike[str],
                      metadata: dict[str, Any] | None = None) -> Path:
    """Write ``model.embed`` as ONNX to ``out`` atomically (temp file + rename); returns the
    path. A model whose backbone carries a ready graph (:func:`embedded_graph`) writes that,
    nothing is traced; else tries the TorchScript-based exporter first (well under a second,
    against several seconds for EfficientNet-Lite0 with the torch.export-based one), then
    the torch.export one (torch removes the TorchScript exporter in a future release)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model = model.to("cpu").eval()
    ready = embedded_graph(model)
    with atomic_path(out) as tmp_path:
        tmp = str(tmp_path)
        if ready is None:
            _export_traced(model, pre, tmp)
        else:
            Path(tmp).write_bytes(ready)
        import onnx

        proto = onnx.load(tmp)
        props = {"preprocess": json.dumps(pre.to_dict(), sort_keys=True)}
        if metadata:
            props["fewshot_studio"] = json.dumps(metadata, sort_keys=True)
        for k, v in props.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = k, v
        onnx.save(proto, tmp)
    return out


MAX_EXPORT_BYTES = 1 << 30  # larger than any export of ours: not read to be recognised


def is_onnx_export(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a regular file holding an ONNX model this program exported (its
    ``preprocess`` metadata prop); reads nothing from special files or files over 1 GiB."""
    import stat

    import onnx

    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_EXPORT_BYTES:
            return False
        proto = onnx.load(os.fspath(path), load_external_data=False)
    except Exception:  # not protobuf, not ONNX, unreadable: not ours
        return False
    return any(p.key == "preprocess" for p in proto.metadata_props)


def onnx_session(path: str | os.PathLike[str], providers: list[str] | None = None,
                 threads: int | None = None) -> Any:
    """An ONNX Runtime session tuned for a small shared machine (no busy-spinning threads,
    which would starve the decoding threads)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=so,
                                providers=providers or ["CPUExecutionProvider"])


def max_abs_difference(model: nn.Module, onnx_path: str | os.PathLike[str], pre: Preprocess,
                       batch_sizes: tuple[int, ...] = (1, 3), seed: int = 0) -> float:
    """Largest ``|torch - onnx|`` of ``model.embed`` on random inputs of several batch sizes
    (on the CPU, float32; a graph that fixes its batch size runs in batches of it)."""
    from fewshot_studio.engine.backends import OnnxBackend

    backend = OnnxBackend(onnx_path)
    model = model.to("cpu").eval()
    worst = 0.0
    for i, n in enumerate(batch_sizes):
        x = example_input(pre, n, seed + i)
        with torch.inference_mode():
            ref = model.embed(x).float().numpy()
        got = backend.embed(x.numpy())
        if got.shape != ref.shape:
            raise RuntimeError(f"ONNX output shape {got.shape} != torch {ref.shape}")
        worst = max(worst, float(np.abs(got.astype(np.float64) - ref).max(initial=0.0)))
    return worst


INT8_CHANNEL_MULTIPLE = 4
"""The int8 model zero-pads the input channels of convolutions on the graph input to a multiple
of this: exact, and ONNX Runtime's int8 convolution runs about 2x faster on 4 input channels
than on 3 (Conv4 at 84 px RGB: 164 against 316 us per image for the first convolution)."""


def synthetic_calibration(pre: Preprocess, n: int = 32, seed: int = 0) -> np.ndarray:
    """``(n, C, H, W)`` float32 preprocessed calibration images that need no data: seeded
    uint8 pictures covering what real inputs contain (flat backgrounds light and dark, smooth
    colour gradients, sharp strokes and blocks, fine texture and noise, the full 0..255 range),
    normalised as ``pre`` says. Deterministic, so the int8 model depends on the checkpoint
    only."""
    from fewshot_studio.data.images import normalize_uint8

    rng = np.random.default_rng(seed)
    s, c = pre.image_size, pre.channels
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / max(1, s - 1)
    out = np.empty((n, c, s, s), np.uint8)
    for i in range(n):
        if i % 4:
            a = np.broadcast_to(rng.uniform(0, 255, (c, 1, 1)), (c, s, s)).astype(np.float32)
        else:  # white or black paper
            a = np.full((c, s, s), 255.0 if i % 8 == 0 else 0.0, np.float32)
        if i % 3 == 0:  # smooth colour gradient
            ramp = xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1)
            a = a + rng.uniform(-128, 128, (c, 1, 1)) * ramp
        for _ in range(int(rng.integers(1, 6))):  # sharp strokes and blocks
            x0, y0 = rng.integers(0, s, 2)
            w, h = rng.integers(1, max(2, s // 2), 2)
            if rng.random() < 0.5:
                w = max(1, w // 8)  # a stroke
            a[:, y0:y0 + h, x0:x0 + w] = rng.uniform(0, 255, (c, 1, 1))
        if i % 2:  # texture
            f, phase = rng.uniform(2, 16), rng.uniform(0, 6)
            a += rng.uniform(10, 60) * np.sin(xx * f * np.pi + phase) * np.cos(yy * f * np.pi)
        a += rng.normal(0, rng.uniform(0, 25), a.shape)
        out[i] = np.clip(a, 0, 255).astype(np.uint8)
    return normalize_uint8(out, pre)


def _pad_input_channels(proto: Any, multiple: int = INT8_CHANNEL_MULTIPLE) -> int:
    """Zero-pad, in place, the input channels of every ungrouped ``Conv`` that reads the graph
    input to a multiple of ``multiple``: a ``Pad`` on the input's channel axis and zero weight
    slices (the output is unchanged). Returns the number of convolutions changed."""
    from onnx import helper, numpy_helper

    graph = proto.graph
    image = graph.input[0].name
    inits = {t.name: t for t in graph.initializer}
    convs = [n for n in graph.node if n.op_type == "Conv" and n.input[0] == image
             and n.input[1] in inits
             and all(a.name != "group" or a.i == 1 for a in n.attribute)]
    changed = 0
    for node in convs:
        w = numpy_helper.to_array(inits[node.input[1]])  # (out, in, kh, kw)
        extra = -w.shape[1] % multiple
        if not extra:
            continue
        padded_w = np.concatenate([w, np.zeros((w.shape[0], extra, *w.shape[2:]), w.dtype)], 1)
        inits[node.input[1]].CopyFrom(numpy_helper.from_array(padded_w, node.input[1]))
        tag = f"{node.input[1]}_channel_pad"
        pads = numpy_helper.from_array(np.array([0, 0, 0, 0, 0, extra, 0, 0], np.int64),
                                       f"{tag}_pads")
        graph.initializer.append(pads)
        pad = helper.make_node("Pad", [image, pads.name], [f"{tag}_out"], name=tag,
                               mode="constant")
        graph.node.insert(list(graph.node).index(node), pad)
        node.input[0] = pad.output[0]
        changed += 1
    return changed


_X86 = frozenset({"x86_64", "amd64", "i386", "i686", "x86"})


@functools.lru_cache(maxsize=1)
def int8_weight_bits() -> int:
    """The weight precision of int8 models for this CPU: 8, or 7 on x86 CPUs without VNNI.

    There ONNX Runtime's uint8 x int8 kernels add pairs of products in saturating 16-bit
    lanes (``vpmaddubsw``), so full-range 8-bit weights overflow: measured under an emulated
    Haswell (AVX2, no VNNI), a tiny Conv4 agreed with fp32 on 94% of 24-way labels and 77% on
    random pixels, against 98-99% and 98% with 7-bit weights (``reduce_range``, as ONNX
    Runtime advises for non-VNNI machines). With VNNI (or on ARM) 8-bit weights are exact and
    more accurate, so they are kept there. Unknown x86 features count as no VNNI (safe)."""
    if platform.machine().lower() not in _X86:
        return 8
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:  # numpy moved it: assume the worst
        return 7
    return 8 if features.get("AVX512VNNI") else 7


def int8_variant() -> str:
    """The name of this CPU's int8 models (file suffix, feature-cache key): "int8" (8-bit
    weights) or "int8w7" (7-bit, see :func:`int8_weight_bits`)."""
    return "int8" if int8_weight_bits() == 8 else "int8w7"


def quantize_embed_onnx(src: str | os.PathLike[str], out: str | os.PathLike[str],
                        calibration: np.ndarray, batch_size: int = 8,
                        weight_bits: int | None = None) -> Path:
    """Write a static int8 version of the exported embed graph ``src`` to ``out`` atomically;
    returns the path. Same ``images`` ``(n, C, H, W)`` float32 input and ``features`` float32
    output; inside, QDQ (QuantizeLinear/DequantizeLinear) pairs that ONNX Runtime fuses into
    int8 kernels: per-output-channel int8 weights, uint8 activations whose ranges are the
    MinMax of ``calibration`` (``(n, C, H, W)`` float32 preprocessed images) run through the
    graph ``batch_size`` at a time (the graph's own batch size if it fixes one). Input
    channels are padded first (:func:`_pad_input_channels`). ``weight_bits``: 8, or 7
    (``reduce_range``); None: what :func:`int8_weight_bits` says for this CPU. Metadata props
    are kept. Raises whatever the quantiser raises (callers fall back to fp32)."""
    import onnx
    from onnxruntime import quantization as q

    bits = int8_weight_bits() if weight_bits is None else weight_bits
    if bits not in (7, 8):
        raise ValueError(f"weight_bits must be 7 or 8, not {bits}")
    proto = onnx.load(str(src))
    batch = proto.graph.input[0].type.tensor_type.shape.dim[0]
    if batch.dim_value > 0:  # an imported graph may fix its batch size: calibrate in those
        batch_size = batch.dim_value
        calibration = calibration[:len(calibration) // batch_size * batch_size]
    calibration = np.ascontiguousarray(calibration, dtype=np.float32)
    if calibration.ndim != 4 or not len(calibration):
        raise ValueError(f"calibration must be (n, C, H, W) images, got {calibration.shape}")
    feeds = [{INPUT_NAME: calibration[i:i + batch_size]}
             for i in range(0, len(calibration), batch_size)]

    class _Reader(q.CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _pad_input_channels(proto)
    with tempfile.TemporaryDirectory(prefix="fewshot-int8-") as work, \
            atomic_path(out) as tmp_path:
        padded, prepared = Path(work) / "padded.onnx", Path(work) / "prepared.onnx"
        onnx.save(proto, str(padded))
        with _quiet():
            # shape inference and ONNX Runtime's basic graph optimisations (the symbolic
            # shape inference is for dynamic shapes this graph does not have, and slow)
            q.quant_pre_process(str(padded), str(prepared), skip_symbolic_shape=True)
            q.quantize_static(str(prepared), str(tmp_path), _Reader(),
                              quant_format=q.QuantFormat.QDQ, per_channel=True,
                              activation_type=q.QuantType.QUInt8,
                              weight_type=q.QuantType.QInt8, reduce_range=bits == 7,
                              calibrate_method=q.CalibrationMethod.MinMax)
    return out
