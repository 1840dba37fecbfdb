"""The labeling session's fine-tuned model (``LabelSettings.adapt="finetune"``): a copy of
the checkpoint's model fine-tuned on the support images
(:func:`~fewshot_studio.models.finetune.finetune`), kept for the session only (never
written to a checkpoint).

Its features are cached like any others, under a model id that names the checkpoint, the
fine-tuning settings and the support set (every example's path, size and mtime, in class
order): the same examples give the same fine-tuned model and hit the cache; another example
makes another model. It embeds with torch (the copy is never exported to ONNX).
"""

from __future__ import annotations

import copy
import hashlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from fewshot_studio.data.preprocess import Preprocess
from fewshot_studio.errors import UserError
from fewshot_studio.models.base import FewShotClassifier
from fewshot_studio.models.finetune import (
    FinetuneSettings,
    augment_for,
    can_finetune,
    finetune,
)
from fewshot_studio.progress import Progress

# FinetuneSettings' defaults: chosen on the dev sets (Caltech-101 val classes, GTSRB,
# CIFAR-10; 5-way 5-shot, paired against prototypes) with benchmarks/finetune.py, the same
# settings as `eval --adapt finetune`; see the model card's table.
FINETUNE_SETTINGS = FinetuneSettings()


def support_key(model_id: str, classes: Mapping[str, Sequence[Path]],
                settings: FinetuneSettings) -> str:
    """A hex digest naming the checkpoint, the settings and the support set: each class's
    name and its examples' paths, sizes and mtimes, in order."""
    h = hashlib.sha256()
    h.update(model_id.encode())
    h.update(settings.key().encode())
    for name, paths in classes.items():
        h.update(b"\0class\0" + name.encode())
        for p in paths:
            try:
                st = os.stat(p)
                h.update(f"\0{os.fspath(p)}\0{st.st_size}\0{st.st_mtime_ns}".encode())
            except OSError:
                h.update(f"\0{os.fspath(p)}\0missing".encode())
    return h.hexdigest()


class FinetunedModel:
    """The session's fine-tuned copy of ``model``, rebuilt when the support set or the
    settings change (:meth:`update`). ``model`` / ``model_id``: the copy and its feature
    id, None / "" before the first update."""

    def __init__(self, model: FewShotClassifier, preprocess: Preprocess, base_id: str,
                 settings: FinetuneSettings = FINETUNE_SETTINGS) -> None:
        self.base = model
        self.preprocess = preprocess
        self.base_id = base_id
        self.settings = settings
        self.model: FewShotClassifier | None = None
        self.model_id = ""
        self._key = ""

    def update(self, classes: Mapping[str, Sequence[Path]],
               decode: Callable[[str], np.ndarray | str], device: str = "cpu"
               ) -> Iterator[Progress]:
        """Fine-tune on the readable images of ``classes`` (name -> paths, class index =
        position; ``decode(path)``: the preprocessed ``(C, H, W)`` image or why there is
        none) unless the support set and settings are those of the current copy, on
        ``device`` ("cuda": a CUDA copy of the model trains; the result comes back to the
        CPU, where the session keeps its models). Yields
        :class:`Progress` ("fine-tuning on the examples"); closing the generator cancels and
        keeps the previous copy. UserError for a model that cannot be fine-tuned."""
        if not can_finetune(self.base):
            raise UserError(f"fine-tuning does not apply to this {self.base.method_name} "
                            "checkpoint (ProtoNet and Relation Network checkpoints with a "
                            "built-in backbone can be fine-tuned)")
        key = support_key(self.base_id, classes, self.settings)
        if key == self._key and self.model is not None:
            return
        images, labels = [], []
        for c, paths in enumerate(classes.values()):
            for p in paths:
                a = decode(str(p))
                if not isinstance(a, str):
                    images.append(a)
                    labels.append(c)
        if not images:
            raise UserError("no readable example image to fine-tune on")
        x = torch.from_numpy(np.stack(images).astype(np.float32, copy=False)).to(device)
        y = torch.tensor(labels, dtype=torch.long, device=device)
        base = self.base if device == "cpu" else copy.deepcopy(self.base).to(device)
        adapted: FewShotClassifier | None = None
        for p in finetune(base, x, y, augment_for(self.preprocess, self.settings.strength),
                          self.settings,
                          n_way=len(classes)):
            adapted = p.payload if p.payload is not None else adapted
            yield Progress(p.done, p.total, "fine-tuning on the examples", p.metrics)
        assert adapted is not None
        self.model, self._key = adapted.cpu(), key
        base, _, fmt = self.base_id.partition(":")
        self.model_id = f"{base}-ft{key[:16]}:{fmt}"
