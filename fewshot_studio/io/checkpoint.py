"""Self-describing checkpoints: one ``.safetensors`` file whose header carries the JSON
metadata (method, backbone, preprocessing, training config, measured accuracy, version).

Loading never unpickles: safetensors holds raw tensors and the metadata is JSON.
"""

from __future__ import annotations

import json
import os
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


class CheckpointError(UserError):
    """A file that is not a FewShot Studio checkpoint, or is damaged. The message is one line
    fit to show a user."""


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
        """The model with these weights, in eval mode, on ``device``."""
        from fewshot_studio.models import build_model

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
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: checkpoint metadata is damaged") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unsupported checkpoint format {meta.get('format')!r}")
    return meta


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Read a checkpoint; raises :class:`CheckpointError` with a one-line message if the file
    is missing, not ours or damaged."""
    meta = read_metadata(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: checkpoint weights are damaged ({e})") from None
    state = {k: (v.float() if v.dtype == torch.float16 else v) for k, v in tensors.items()}
    try:
        return Checkpoint(
            model=meta["model"],
            preprocess=Preprocess.from_dict(meta["preprocess"]),
            state_dict=state,
            name=meta.get("name", ""),
            description=meta.get("description", ""),
            training=meta.get("training", {}),
            evaluation=meta.get("evaluation", {}),
            package_version=meta.get("package_version", ""),
        )
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: checkpoint metadata is incomplete ({e})") from None
