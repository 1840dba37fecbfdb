"""Self-describing checkpoints: one ``.safetensors`` file whose header carries the JSON
metadata (method, backbone, preprocessing, training config, measured accuracy, version).

Loading never unpickles: safetensors holds raw tensors and the metadata is JSON. Nothing in
a file is trusted before it is checked: the metadata's structure and preprocessing values
first, then the model it describes is built on the ``meta`` device (no memory) and every
parameter and buffer shape is compared with the tensors the file really holds (read from the
header, not loaded); only then are the weights loaded (and refused if any is NaN or Inf) and
the model built for real. So a 6 KB file claiming ``hidden=4096`` fails in milliseconds.

A backbone that is an imported ONNX model (``fewshot-studio import-backbone``,
:mod:`fewshot_studio.models.backbones.onnx_graph`) is stored the same way: the serialised
graph is one ``uint8`` tensor (``backbone.graph``) whose length the backbone's config states,
so the shape check above refuses a cut graph, and ``dtype=float16`` leaves it untouched.

Calibration: ``fewshot-studio calibrate`` (:mod:`fewshot_studio.training.calibrate`) stores a
fitted softmax temperature under ``evaluation[CALIBRATION_KEY]`` (``{"temperature": T,
"data": ..., "way": ..., ...}``); :attr:`Checkpoint.temperature` reads it (1.0 for old
checkpoints), so the labeling engine needs nothing from ``training/``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fewshot_studio import __version__
from fewshot_studio.data.preprocess import Preprocess
from fewshot_studio.errors import UserError
from fewshot_studio.io.atomic import atomic_path

FORMAT = "fewshot-studio/1"
_META_KEY = "fewshot_studio"
CALIBRATION_KEY = "calibration"  # key in Checkpoint.evaluation: the calibration record


class CheckpointError(UserError):
    """A file that is not a FewShot Studio checkpoint, or is damaged. The message is one line
    fit to show a user."""


def temperature_from_metadata(evaluation: Mapping[str, Any] | None) -> float:
    """The temperature recorded in a checkpoint's ``evaluation`` metadata (under
    :data:`CALIBRATION_KEY`); 1.0 when there is none (old checkpoints) or it is not a positive
    finite number."""
    rec = (evaluation or {}).get(CALIBRATION_KEY)
    t = rec.get("temperature") if isinstance(rec, Mapping) else None
    try:
        t = float(t)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 1.0
    return t if math.isfinite(t) and t > 0 else 1.0


@dataclass
class Checkpoint:
    """A model's weights with everything needed to use it.

    ``model``: the model spec for :func:`fewshot_studio.models.build_model`;
    ``preprocess``: how images become inputs; ``training``: the config and data it was
    trained with; ``evaluation``: measured results, e.g. ``{"omniglot-eval 5w1s":
    {"accuracy": 0.985, "ci95": 0.002, "episodes": 1000}}``.
    """

    model: dict[str, Any]
    preprocess: Preprocess
    state_dict: dict[str, torch.Tensor]
    name: str = ""
    description: str = ""
    training: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)
    package_version: str = __version__

    @property
    def temperature(self) -> float:
        """The softmax temperature fitted by ``fewshot-studio calibrate`` (Guo et al. 2017);
        1.0 when none is recorded. See :func:`temperature_from_metadata`."""
        return temperature_from_metadata(self.evaluation)

    def metadata(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "name": self.name,
            "description": self.description,
            "model": self.model,
            "preprocess": self.preprocess.to_dict(),
            "training": self.training,
            "evaluation": self.evaluation,
            "package_version": self.package_version,
        }

    def build(self, device: str | torch.device = "cpu") -> torch.nn.Module:
        """The model with these weights, in eval mode, on ``device``. The shapes are checked
        on the ``meta`` device first (:class:`CheckpointError` naming the first mismatch), so a
        spec that does not fit the weights never allocates the model it claims."""
        from fewshot_studio.models import build_model

        check_shapes(self.model, {k: tuple(v.shape) for k, v in self.state_dict.items()})
        model = build_model(self.model)
        model.load_state_dict(self.state_dict)
        return model.to(device).eval()


def save_checkpoint(path: str | os.PathLike[str], ckpt: Checkpoint,
                    dtype: torch.dtype | None = None) -> Path:
    """Write ``ckpt`` atomically (temp file + rename). ``dtype=torch.float16`` halves the size
    of floating-point weights (they are cast back to float32 on load)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for k, v in ckpt.state_dict.items():
        v = v.detach().cpu()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        tensors[k] = v.contiguous()
    meta = {_META_KEY: json.dumps(ckpt.metadata(), sort_keys=True)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON metadata of a checkpoint, without loading its weights."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(_META_KEY)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a FewShot Studio checkpoint "
                              f"(not a readable safetensors file: {e})") from None
    if raw is None:
        raise CheckpointError(f"{path} is a safetensors file but not a FewShot Studio "
                              "checkpoint (no metadata)")
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, RecursionError):
        raise CheckpointError(f"{path}: checkpoint metadata is damaged") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: checkpoint metadata is damaged (not an object)")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unsupported checkpoint format {meta.get('format')!r}")
    return meta


def _shape_text(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(n) for n in shape) + ")"


def check_shapes(spec: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> None:
    """Build the model ``spec`` describes on the ``meta`` device (nothing allocated) and
    compare its state dict (names and shapes) with ``shapes``. :class:`CheckpointError`
    naming the first mismatch (a missing, unexpected or differently shaped tensor)."""
    from fewshot_studio.models import build_model

    try:
        with torch.device("meta"):
            model = build_model(spec)
    except Exception as e:
        raise CheckpointError(f"cannot build the model it describes "
                              f"({type(e).__name__}: {_short(e)})") from None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for k, shape in expected.items():
        if k not in shapes:
            raise CheckpointError(f"the weights do not fit the model it describes "
                                  f"(tensor {k} is missing)")
        if tuple(shapes[k]) != shape:
            raise CheckpointError(f"the weights do not fit the model it describes (tensor {k} "
                                  f"is {_shape_text(tuple(shapes[k]))} in the file, the model "
                                  f"needs {_shape_text(shape)})")
    extra = [k for k in shapes if k not in expected]
    if extra:
        raise CheckpointError(f"the weights do not fit the model it describes "
                              f"(unexpected tensor {extra[0]})")


def _short(e: object, limit: int = 160) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _checked_fields(path: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """The Checkpoint fields of ``meta``, type-checked; :class:`CheckpointError` naming the
    first bad one."""

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: checkpoint metadata is damaged ({what})")

    model = meta.get("model")
    if not isinstance(model, dict):
        raise bad(f"'model' must be an object, not {type(model).__name__}")
    for key in ("method", "backbone"):
        if not isinstance(model.get(key), str):
            raise bad(f"'model.{key}' must be a name, not {type(model.get(key)).__name__}")
    for key in ("method_config", "backbone_config"):
        if not isinstance(model.get(key, {}), dict):
            raise bad(f"'model.{key}' must be an object, not {type(model[key]).__name__}")
    try:
        preprocess = Preprocess.from_dict(meta.get("preprocess"))
    except UserError as e:
        raise bad(str(e)) from None
    out: dict[str, Any] = {"model": model, "preprocess": preprocess}
    for key, kind, default in (("name", str, ""), ("description", str, ""),
                               ("training", dict, {}), ("evaluation", dict, {}),
                               ("package_version", str, "")):
        value = meta.get(key, default)
        if not isinstance(value, kind):
            raise bad(f"'{key}' must be {'text' if kind is str else 'an object'}, "
                      f"not {type(value).__name__}")
        out[key] = value
    return out


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Read a checkpoint; raises :class:`CheckpointError` with a one-line message if the file
    is missing, not ours or damaged: metadata of the wrong structure or with preprocessing
    values out of range, weights whose names or shapes do not fit the model the metadata
    describes (checked before any weight is loaded), or weights holding NaN or Inf."""
    from safetensors import safe_open

    meta = read_metadata(path)
    path = Path(path)
    kw = _checked_fields(path, meta)
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: checkpoint weights are damaged ({_short(e)})") from None
    try:
        check_shapes(kw["model"], shapes)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: checkpoint weights are damaged ({e})") from None
    state = {k: (v.float() if v.dtype == torch.float16 else v) for k, v in tensors.items()}
    for k, v in state.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise CheckpointError(f"{path}: checkpoint weights contain NaN/Inf (tensor {k})")
    return Checkpoint(state_dict=state, **kw)
