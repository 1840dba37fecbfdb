"""Bring your own backbone: an ONNX image-embedding model or a timm model -> a FewShot Studio
checkpoint (``fewshot-studio import-backbone``).

A timm model (:func:`import_timm_model`) becomes a ProtoNet around
:class:`~fewshot_studio.models.backbones.timm_model.TimmBackbone`: its pretrained weights
(from timm's cache or hub, or a local file) are the checkpoint's weights, its
``pretrained_cfg`` says how images are fed, and fine-tuning applies. The rest of this note
is about ONNX models.

The checkpoint is a ProtoNet (cosine prototypes by default: what suits the embeddings of
foundation models such as DINOv2 or CLIP) whose backbone is the ONNX graph itself
(:class:`~fewshot_studio.models.backbones.onnx_graph.OnnxGraph`): its bytes travel as a
``uint8`` tensor inside the ``.safetensors`` file, so the checkpoint is one file that
``label``, ``eval`` and the app load like any other (prototypes, the many-shot head,
open-set rejection; no fine-tuning: ONNX has no gradients).

How images are fed (size, mean/std, layout "NCHW"/"NHWC") comes from the options, else from
the model's metadata (``metadata_props`` keys ``image_size``, ``mean``, ``std``,
``layout``, ``resize``; numbers as JSON lists or comma-separated), else from its input
shape (size, channels, layout) and ImageNet's mean/std. A model whose weights live in
external data files is refused: the checkpoint must hold everything.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fewshot_studio.data.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from fewshot_studio.errors import UserError
from fewshot_studio.io.checkpoint import Checkpoint


@dataclass(frozen=True)
class InputOptions:
    """What the user says about the model's input (None: read it from the model)."""

    image_size: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    layout: str | None = None
    resize: str | None = None
    channels: int | None = None


def _numbers(text: str) -> tuple[float, ...]:
    """``"[0.5, 0.5, 0.5]"`` or ``"0.5,0.5,0.5"`` -> floats."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = [v for v in text.replace(",", " ").split() if v]
    values = value if isinstance(value, list) else [value]
    try:
        return tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise UserError(f"model metadata: not a list of numbers: {text[:60]!r}") from None


def _dims(value_info: Any) -> list[int | None]:
    """An ONNX input's shape: ints, None for symbolic dimensions."""
    return [d.dim_value if d.HasField("dim_value") else None
            for d in value_info.type.tensor_type.shape.dim]


def _layout_of(dims: list[int | None]) -> str | None:
    """"NCHW" / "NHWC" when the shape says so (channels 1 or 3 in exactly one place)."""
    if len(dims) != 4:
        return None
    chw, hwc = dims[1] in (1, 3), dims[3] in (1, 3)
    return "NCHW" if chw and not hwc else "NHWC" if hwc and not chw else None


def _graph_info(model: Any) -> tuple[str, str, list[int | None]]:
    """``(input name, output name, input shape)``; UserError for graphs that do not fit."""
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise UserError(f"the model must have one image input, it has {len(inputs)}")
    if not model.graph.output:
        raise UserError("the model has no output")
    dims = _dims(inputs[0])
    if len(dims) != 4:
        raise UserError(f"the model's input must be a 4-d image batch, it has {len(dims)} "
                        "dimensions")
    return inputs[0].name, model.graph.output[0].name, dims


def _has_external_data(model: Any) -> bool:
    from onnx import TensorProto

    return any(t.data_location == TensorProto.EXTERNAL for t in model.graph.initializer)


def read_preprocess(model: Any, options: InputOptions) -> tuple[Preprocess, str]:
    """The :class:`Preprocess` and layout of an ONNX model's input: ``options`` first, then
    its metadata, then its input shape (and ImageNet's mean/std)."""
    meta = {p.key: p.value for p in model.metadata_props}
    _, _, dims = _graph_info(model)
    layout = options.layout or meta.get("layout") or _layout_of(dims) or "NCHW"
    if layout not in ("NCHW", "NHWC"):
        raise UserError(f"layout must be NCHW or NHWC, not {layout!r}")
    c_dim, h_dim = (dims[1], dims[2]) if layout == "NCHW" else (dims[3], dims[1])
    channels = options.channels or c_dim or 3
    size = options.image_size or (int(meta["image_size"]) if "image_size" in meta
                                  else h_dim)
    if not size:
        raise UserError("the model's input size is not fixed: give --image-size")
    mean = options.mean or (_numbers(meta["mean"]) if "mean" in meta else
                            IMAGENET_MEAN[:channels] if channels == 3 else (0.5,))
    std = options.std or (_numbers(meta["std"]) if "std" in meta else
                          IMAGENET_STD[:channels] if channels == 3 else (0.5,))
    resize = options.resize or meta.get("resize") or "center_crop"
    pre = Preprocess.from_dict({"image_size": int(size), "channels": int(channels),
                                "mean": list(mean), "std": list(std), "resize": resize,
                                "crop_fraction": 0.875})
    return pre, layout


def import_onnx(path: str | os.PathLike[str], options: InputOptions = InputOptions(),
                name: str = "", distance: str = "cosine") -> Checkpoint:
    """An ONNX image-embedding model -> a :class:`Checkpoint` of a ProtoNet around it
    (``distance`` "cosine" or "euclidean"). The graph is run once on a probe batch: its
    output must be ``(n, d)`` (or ``(n, C, h, w)`` maps, average-pooled) and finite.
    UserError with a one-line reason otherwise."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: not a readable ONNX model ({type(e).__name__})") from None
    return _import_onnx_data(data, hashlib.sha256(data).hexdigest(), path, options, name,
                             distance)


def _import_onnx_data(data: bytes, digest: str, path: Path, options: InputOptions,
                      name: str, distance: str) -> Checkpoint:
    """:func:`import_onnx` of the file ``path`` whose bytes (read once) are ``data`` and
    their SHA-256 ``digest``."""
    import onnx

    from fewshot_studio.models.backbones.onnx_graph import OnnxGraph

    try:
        model = onnx.load_model_from_string(data)
    except Exception as e:  # protobuf's DecodeError (not importable portably)
        raise UserError(f"{path}: not a readable ONNX model ({type(e).__name__})") from None
    if _has_external_data(model):
        raise UserError(f"{path}: the model keeps its weights in external data files; "
                        "save it as one file (onnx.save_model(..., save_as_external_data="
                        "False)) first")
    input_name, output_name, _ = _graph_info(model)
    pre, layout = read_preprocess(model, options)
    probe = OnnxGraph(pre.channels, pre.image_size, len(data), input_name, output_name,
                      layout)
    probe.set_graph(data)
    out = _probe(probe, pre, f"{path}: the model", layout)
    backbone = OnnxGraph(pre.channels, pre.image_size, len(data), input_name, output_name,
                         layout, tuple(out.shape[1:]))
    backbone.graph = probe.graph  # the same bytes: no second copy
    return _protonet_checkpoint(
        backbone, "onnx", out, pre, name or path.stem, distance,
        f"the ONNX model {path.name}",
        {"source": "onnx", "file": path.name, "sha256": digest, "layout": layout,
         "meta_trained": False})


def import_onnx_into(path: str | os.PathLike[str], folder: Path) -> Path:
    """The app's *Open checkpoint* on an ``.onnx`` file: :func:`import_onnx` with what the
    model itself says about its input (metadata, input shape, ImageNet's mean/std), saved as
    ``folder/<stem>.safetensors`` (``<stem>-2`` ... beside a file that is another model's).
    A file imported before from the same bytes is used as it is. Returns its path;
    UserError as :func:`import_onnx`."""
    from fewshot_studio.io.checkpoint import CheckpointError, read_metadata, save_checkpoint

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror or e})") from None
    digest = hashlib.sha256(data).hexdigest()
    for n in range(1, 1000):
        out = folder / f"{path.stem}{'' if n == 1 else f'-{n}'}.safetensors"
        if not out.exists():
            break
        try:
            done = read_metadata(out).get("training", {}).get("imported", {})
        except CheckpointError:
            continue
        if done.get("sha256") == digest:
            return out
    return save_checkpoint(out, _import_onnx_data(data, digest, path, InputOptions(), "",
                                                  "cosine"))


def timm_preprocess(cfg: dict[str, Any], options: InputOptions) -> Preprocess:
    """The :class:`Preprocess` of a timm model: ``options`` first, then its
    ``pretrained_cfg`` (``input_size``, ``mean``, ``std``, ``crop_pct``, ``crop_mode``), then
    ImageNet's."""
    if options.layout not in (None, "NCHW"):
        raise UserError("a timm model takes NCHW images: --layout is for ONNX models")
    c, h, _ = tuple(cfg.get("input_size") or (3, 224, 224))  # (C, H, W)
    channels = int(options.channels or c)
    mean = options.mean or tuple(cfg.get("mean") or IMAGENET_MEAN)
    std = options.std or tuple(cfg.get("std") or IMAGENET_STD)
    if channels == 1 and len(mean) != 1:  # grey input: timm sums the RGB stem's weights
        mean, std = (sum(mean) / len(mean),), (sum(std) / len(std),)
    return Preprocess.from_dict({
        "image_size": int(options.image_size or h), "channels": channels,
        "mean": list(mean), "std": list(std),
        "resize": options.resize or ("squash" if cfg.get("crop_mode") == "squash"
                                     else "center_crop"),
        "crop_fraction": float(cfg.get("crop_pct") or 0.875)})


def import_timm_model(model_name: str, options: InputOptions = InputOptions(),
                      weights: str | os.PathLike[str] | None = None, name: str = "",
                      distance: str = "cosine") -> Checkpoint:
    """A timm model (``timm.create_model(model_name, pretrained=True, num_classes=0)``; its
    weights from ``weights``, a local file, when given, else timm's cache or hub) -> a
    :class:`Checkpoint` of a ProtoNet around it, whose weights the checkpoint holds. How
    images are fed comes from ``options``, else the model's ``pretrained_cfg``
    (:func:`timm_preprocess`). UserError with a one-line reason when it cannot be had."""
    from fewshot_studio.models.backbones.timm_model import TimmBackbone, create_timm_model

    if weights is not None and not Path(weights).is_file():
        raise UserError(f"no such weights file: {weights}")
    module = create_timm_model(model_name, options.channels or 3, pretrained=True,
                               weights_file=weights).eval()
    pre = timm_preprocess(dict(module.pretrained_cfg or {}), options)
    with torch.no_grad():  # the backbone's forward is the module's
        out = _probe(module, pre, f"timm model {model_name!r}", "NCHW")
    backbone = TimmBackbone(model_name, pre.channels, pre.image_size, tuple(out.shape[1:]),
                            model=module)
    source = Path(weights).name if weights is not None else "timm's cache or hub"
    return _protonet_checkpoint(
        backbone, "timm", out, pre, name or model_name.replace("/", "_"), distance,
        f"the timm model {model_name}",
        {"source": "timm", "model": model_name, "weights": source, "meta_trained": False})


def _probe(backbone: nn.Module, pre: Preprocess, what: str, layout: str) -> Tensor:
    """``backbone`` run on a random batch of 2: its ``(2, d)`` or ``(2, C, h, w)`` output,
    finite; UserError (naming ``what``) otherwise."""
    x = torch.randn(2, pre.channels, pre.image_size, pre.image_size)
    try:
        out = backbone(x)
    except Exception as e:
        raise UserError(f"{what} does not run on a {pre.image_size} px {layout} batch "
                        f"({type(e).__name__}: {str(e)[:120]})") from None
    if out.dim() not in (2, 4) or out.shape[0] != 2:
        raise UserError(f"{what}'s output must be (batch, features) or (batch, C, h, w) "
                        f"maps, not {tuple(out.shape)}")
    if not bool(torch.isfinite(out).all()):
        raise UserError(f"{what}'s output holds NaN or Inf")
    return out


def _protonet_checkpoint(backbone: nn.Module, backbone_name: str, out: Tensor,
                         pre: Preprocess, name: str, distance: str, source: str,
                         imported: dict[str, Any]) -> Checkpoint:
    """A ProtoNet (``distance``) around an imported ``backbone`` whose probe output was
    ``out``: maps are average-pooled, vectors used as they are."""
    from fewshot_studio.models import create_method, model_spec

    method = create_method("protonet", backbone, distance=distance,
                           pool="avg" if out.dim() == 4 else "flatten")
    return Checkpoint(
        model=model_spec(method, backbone_name, backbone.config()), preprocess=pre,
        state_dict={k: v.detach().clone() for k, v in method.state_dict().items()},
        name=name,
        description=f"ProtoNet ({distance}) on {source} "
                    f"({int(np.prod(out.shape[1:]))}-d features), imported",
        training={"imported": imported})
