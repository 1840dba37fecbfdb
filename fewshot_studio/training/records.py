"""Evaluation results recorded in a checkpoint's metadata: the labels they are recorded under
(what ``fewshot-studio eval --write-results`` writes and the bundled-checkpoint script reads)
and the one way to add a record to a checkpoint file.

Importing this module imports no torch (the CLI's ``--help`` stays fast); recording does.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def result_key(label: str, way: int, shot: int) -> str:
    """``"<label> <way>w<shot>s"``: the key of one protocol's result."""
    return f"{label} {way}w{shot}s"


def transductive_label(label: str, iters: int) -> str:
    """The label ``eval --transductive ITERS --write-results`` records its results under."""
    return f"{label} transductive x{iters}"


def tta_label(label: str, views: int) -> str:
    """The label ``eval --tta VIEWS --write-results`` records its results under (before any
    transductive suffix)."""
    return f"{label} TTA x{views}"


def within_alphabet_label(label: str) -> str:
    """The label ``eval --within-alphabet --write-results`` records its results under."""
    return f"{label} within-alphabet"


def eval_label(label: str | None, data: Sequence[str], classes: str | None,
               within_alphabet: bool = False, tta: int = 0, transductive: int = 0) -> str:
    """The label an evaluation is recorded under: ``label`` (default: the data's file stems
    joined by ``+``), the class list's stem in brackets, then the protocol's suffixes."""
    out = label or "+".join(Path(d).stem for d in data)
    if classes:
        out += f" [{Path(classes).stem}]"
    if within_alphabet:
        out = within_alphabet_label(out)
    if tta:
        out = tta_label(out, tta)
    if transductive:
        out = transductive_label(out, transductive)
    return out


def record_result(path: Path, key: str, value: dict[str, Any]) -> None:
    """Add ``key: value`` to the checkpoint's evaluation metadata: an atomic rewrite through
    ``save_checkpoint`` that keeps the stored weights' dtype (fp16 files stay fp16)."""
    import torch
    from safetensors import safe_open

    from fewshot_studio.io.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(path)
    with safe_open(str(path), framework="pt") as f:
        half = any(f.get_slice(k).get_dtype() == "F16" for k in f.keys())  # noqa: SIM118
    ckpt.evaluation = {**ckpt.evaluation, key: value}
    save_checkpoint(path, ckpt, dtype=torch.float16 if half else None)
