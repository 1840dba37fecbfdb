"""Export a checkpoint's support-independent part (``model.embed``) to ONNX, and check the
export against torch.

The graph maps ``images`` ``(n, C, H, W)`` float32 (preprocessed: resized and normalised as
the checkpoint's :class:`~fewshot_studio.data.preprocess.Preprocess` says) to ``features``
``(n, *feature_shape)`` float32, with a dynamic batch axis. The checkpoint's metadata and
preprocessing travel in the ONNX model's ``metadata_props``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fewshot_studio.data.preprocess import Preprocess
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


def export_embed_onnx(model: nn.Module, pre: Preprocess, out: str | os.PathLike[str],
                      metadata: dict[str, Any] | None = None) -> Path:
    """Write ``model.embed`` as ONNX to ``out`` atomically (temp file + rename); returns the
    path. Tries the TorchScript-based exporter first (well under a second, against several
    seconds for EfficientNet-Lite0 with the torch.export-based one), then the torch.export
    one (torch removes the TorchScript exporter in a future release)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model = model.to("cpu").eval()
    module = _Embed(model).eval()
    x = example_input(pre, 2)
    with atomic_path(out) as tmp_path:
        tmp = str(tmp_path)
        errors = []
        for exporter in (_export_legacy, _export_dynamo):
            try:
                with _quiet(), torch.no_grad():
                    exporter(module, x, tmp)
                break
            except Exception as e:  # pragma: no cover - depends on the torch version
                errors.append(f"{exporter.__name__}: {type(e).__name__}: {e}")
        else:
            raise RuntimeError("ONNX export failed: " + " | ".join(errors))
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
    (on the CPU, float32)."""
    sess = onnx_session(onnx_path)
    model = model.to("cpu").eval()
    worst = 0.0
    for i, n in enumerate(batch_sizes):
        x = example_input(pre, n, seed + i)
        with torch.inference_mode():
            ref = model.embed(x).float().numpy()
        got = sess.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
        if got.shape != ref.shape:
            raise RuntimeError(f"ONNX output shape {got.shape} != torch {ref.shape}")
        worst = max(worst, float(np.abs(got.astype(np.float64) - ref).max(initial=0.0)))
    return worst
