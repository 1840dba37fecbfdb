"""The resume state of a training run: weights + optimiser state + RNG states + JSON
metadata in one ``.safetensors`` file (tensors as safetensors, the rest as JSON in its header;
never a pickle)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from fewshot_studio.errors import UserError
from fewshot_studio.training.evaluate import EvalResult

STATE_FORMAT = "fewshot-studio-train-state/1"
MODEL_PREFIX = "model."  # the model's tensors in the file; optimiser: "optim.", RNG: "rng."


def _optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, Tensor):
                tensors[f"optim.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(opt: torch.optim.Optimizer, tensors: dict[str, Tensor],
                         meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    for pid, sc in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(sc)
    groups = meta["param_groups"]
    for g, current in zip(groups, opt.param_groups, strict=False):
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        for impl in ("fused", "foreach", "capturable"):  # this device's implementation
            if impl in current:
                g[impl] = current[impl]
    opt.load_state_dict({"state": state, "param_groups": groups})


def save_train_state(path: Path, model: nn.Module, opt: torch.optim.Optimizer,
                     meta: dict[str, Any], rng_states: Sequence[Tensor]) -> None:
    """Write weights, optimiser state, RNG states and ``meta`` (JSON) atomically."""
    tensors = {f"{MODEL_PREFIX}{k}": v.detach().cpu().contiguous()
               for k, v in model.state_dict().items()}
    opt_tensors, opt_meta = _optimizer_to_flat(opt)
    tensors.update(opt_tensors)
    for r, s in enumerate(rng_states):
        tensors[f"rng.{r}"] = s.cpu().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    header = {"format": STATE_FORMAT, "meta": json.dumps({**meta, "optimizer": opt_meta})}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=header)
    os.replace(tmp, path)


def load_train_state(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``(tensors, meta)`` of a train-state file; UserError when missing or damaged."""
    from safetensors import safe_open

    if not path.is_file():
        raise UserError(f"nothing to resume: {path} not found (start without --resume)")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        tensors = load_file(str(path))
        if header.get("format") != STATE_FORMAT:
            raise ValueError("not a training state file")
        meta = json.loads(header["meta"])
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot resume from {path}: {e}") from None
    return tensors, meta


def model_state(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """The model's state dict out of a train-state file's tensors (those under ``model.``)."""
    return {k.removeprefix(MODEL_PREFIX): v for k, v in tensors.items()
            if k.startswith(MODEL_PREFIX)}


@dataclass
class RunState:
    """What a training run carries from step to step and across a resume: optimiser steps
    done, the best validation so far and the wall time spent in earlier processes."""

    step: int = 0
    best_acc: float = -1.0
    best_val: EvalResult | None = None
    elapsed_before: float = 0.0

    def save(self, path: Path, model: nn.Module, opt: torch.optim.Optimizer, *,
             config: dict[str, Any], elapsed_s: float, sampler_states: list[Any],
             world_size: int, rng_states: Sequence[Tensor]) -> None:
        """Write the resume state (:func:`save_train_state`): this state, the run's config,
        each rank's sampler state (None where unknown) and RNG state."""
        save_train_state(path, model, opt, {
            "step": self.step, "config": config, "best_acc": self.best_acc,
            "elapsed_s": elapsed_s, "sampler_states": sampler_states,
            "best_val": self.best_val.to_dict() if self.best_val is not None else None,
            "world_size": world_size,
        }, rng_states)

    @classmethod
    def from_saved(cls, meta: dict[str, Any]) -> RunState:
        """The state :meth:`save` wrote (``meta`` from :func:`load_train_state`)."""
        best = meta.get("best_val")
        return cls(step=int(meta["step"]), best_acc=float(meta.get("best_acc", -1.0)),
                   best_val=EvalResult.from_dict(best) if best else None,
                   elapsed_before=float(meta.get("elapsed_s", 0.0)))

