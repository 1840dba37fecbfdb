"""Meta-training settings: one frozen dataclass, JSON round-trip (stored in every checkpoint's
``training`` metadata, so a checkpoint records the exact run that made it)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from fewshot_studio.data.preprocess import Preprocess
from fewshot_studio.errors import UserError

SPLITS = ("random", "groups", "vinyals", "vinyals-trainval", "files", "none")
SCHEDULES = ("cosine", "step", "constant")
AUGMENTS = ("none", "omniglot", "photo")
DEVICES = ("auto", "cpu", "cuda")
ROTATIONS = (0, 90, 180, 270)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a meta-training run.

    Model: ``method`` / ``backbone`` are registry names (``fewshot_studio.models.METHODS`` /
    ``BACKBONES``); ``method_kwargs`` / ``backbone_kwargs`` go to their factories
    (``in_channels`` and ``image_size`` are filled from ``preprocess``).

    Data: ``data`` is one or more class-folder datasets (folders or .zip files); classes with
    the same name in several datasets are merged. ``split`` chooses the validation classes:

    * ``"random"``: ``val_fraction`` of the classes, at random (seeded);
    * ``"groups"``: whole top-level groups (e.g. Omniglot alphabets), ``val_fraction`` of them;
    * ``"vinyals"``: train / val from ``splits/vinyals_{train,val}.txt`` (Omniglot; the
      split's rotations are used);
    * ``"vinyals-trainval"``: train on ``vinyals_trainval`` (the papers' protocol); validation
      on ``vinyals_val`` (then not held out: a sanity check only);
    * ``"files"``: ``train_classes`` / ``val_classes`` text files, one class per line
      (``train_classes`` empty: every class not in ``val_classes``);
    * ``"none"``: no validation; ``best`` is the last checkpoint.

    ``rotations``: each training class is also shown rotated by these angles, as new classes
    (Omniglot: ``(0, 90, 180, 270)``). Validation classes are not rotated (except with the
    Vinyals splits, whose lists name rotated classes).

    Episodes: ``way``/``shot``/``query`` for training, ``val_way``/``val_shot``/``val_query``
    for validation (``val_episodes`` fixed episodes every ``val_every`` steps;
    ``val_query`` None: 15, or fewer when the smallest validation class has fewer images).
    ``meta_batch`` tasks per optimiser step (MAML). ``episodes`` counts optimiser steps.
    ``within_alphabet_fraction``: that fraction of the training episodes is hard: all its
    classes from one alphabet (the first folder level of the class names; Omniglot
    alphabets), support and query images by different drawers (the file-name suffix
    ``_NN``); the rest are random-class episodes. ``val_within_alphabet``: validate on such
    episodes only (Lake et al.'s within-alphabet protocol; needs whole alphabets held out,
    e.g. ``split="groups"``).

    Optimiser: Adam with ``lr`` and ``weight_decay``; ``schedule`` ``"cosine"`` (to
    ``lr * min_lr_ratio``, after ``warmup`` linear steps), ``"step"`` (times ``gamma`` every
    ``step_size`` steps) or ``"constant"``.

    ``augment``: ``"omniglot"`` (small affine warps + stroke thickness), ``"photo"`` (random
    resized crop, flip, colour jitter) or ``"none"``; done on the device; ``augment_strength``
    scales every range (0: none, 1: the defaults).
    ``device``: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``. ``amp``: bfloat16
    autocast on CUDA. ``time_limit_s``: stop (with checkpoints) after this many seconds.
    ``fit_schedule``: with a time limit, the learning-rate schedule runs on whichever comes
    first, the episodes or the time, so a run cut short by its time limit still ends at the
    schedule's last learning rate (the episodes trained are recorded in the checkpoint).
    ``compile``: run the training step under ``torch.compile`` (on CUDA with CUDA graphs,
    ``mode="reduce-overhead"``): small models are launch-bound there; the first steps are
    slow while it compiles.
    ``fp16_checkpoints``: best/last store float16 weights (half the size; the resume state
    stays float32).
    """

    method: str = "protonet"
    method_kwargs: dict[str, Any] = field(default_factory=dict)
    backbone: str = "conv4"
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    preprocess: Preprocess = field(default_factory=Preprocess)

    data: tuple[str, ...] = ()
    split: str = "random"
    val_fraction: float = 0.1
    train_classes: str | None = None
    val_classes: str | None = None
    splits_dir: str | None = None
    rotations: tuple[int, ...] = (0,)

    way: int = 5
    shot: int = 5
    query: int = 5
    meta_batch: int = 1
    episodes: int = 1000
    within_alphabet_fraction: float = 0.0

    lr: float = 1e-3
    schedule: str = "cosine"
    warmup: int = 0
    min_lr_ratio: float = 0.01
    step_size: int = 2000
    gamma: float = 0.5
    weight_decay: float = 0.0
    grad_clip: float | None = None

    augment: str = "none"
    augment_strength: float = 1.0

    val_every: int = 500
    val_episodes: int = 200
    val_way: int = 5
    val_shot: int = 1
    val_query: int | None = None
    val_within_alphabet: bool = False

    seed: int = 0
    device: str = "auto"
    amp: bool = False
    out: str = "runs/run"
    name: str = ""
    description: str = ""
    log_every: int = 20
    fp16_checkpoints: bool = False
    time_limit_s: float | None = None
    fit_schedule: bool = False
    compile: bool = False

    def __post_init__(self) -> None:
        # Normalise containers so JSON round-trips compare equal.
        object.__setattr__(self, "data", tuple(str(d) for d in self.data))
        object.__setattr__(self, "rotations", tuple(int(r) for r in self.rotations))
        object.__setattr__(self, "method_kwargs", dict(self.method_kwargs))
        object.__setattr__(self, "backbone_kwargs", dict(self.backbone_kwargs))
        if isinstance(self.preprocess, dict):
            object.__setattr__(self, "preprocess", Preprocess.from_dict(self.preprocess))

    # -- checks --------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise :class:`UserError` for settings that cannot work (before any work starts):
        the first of :meth:`_check_choices`' and then :meth:`_check_numbers`' problems."""
        self._check_choices()
        self._check_numbers()

    def _check_choices(self) -> None:
        """Data given; registry names, split, schedule, augmentation, device and rotations
        known."""
        if not self.data:
            raise UserError("no training data given (--data)")
        from fewshot_studio.models import BACKBONES, METHODS

        for registry, name in ((METHODS, self.method), (BACKBONES, self.backbone)):
            if name not in registry:
                raise UserError(f"unknown {registry.kind} {name!r} "
                                f"(known: {', '.join(registry.names())})")
        for what, value, choices in (("split", self.split, SPLITS),
                                     ("schedule", self.schedule, SCHEDULES),
                                     ("augmentation", self.augment, AUGMENTS),
                                     ("device", self.device, DEVICES)):
            if value not in choices:
                raise UserError(f"unknown {what} {value!r} (choose from {', '.join(choices)})")
        for r in self.rotations:
            if r not in ROTATIONS:
                raise UserError(f"rotation {r} not supported (choose from 0, 90, 180, 270)")

    def _check_numbers(self) -> None:
        """Episode sizes, counts, rates and fractions in range; options that need another."""
        for name in ("way", "shot", "query", "meta_batch", "val_way", "val_shot", "val_query"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"{name.replace('_', '-')} must be at least 1")
        problems = (
            (self.way < 2 or self.val_way < 2, "way must be at least 2"),
            (self.episodes < 1, "episodes must be at least 1"),
            (not 0.0 <= self.within_alphabet_fraction <= 1.0,
             "--within-alphabet-fraction must be between 0 and 1"),
            (self.lr <= 0, "lr must be positive"),
            (not 0.0 < self.val_fraction < 1.0 and self.split in ("random", "groups"),
             "--val-classes fraction must be between 0 and 1"),
            (self.fit_schedule and not self.time_limit_s, "--fit-schedule needs --time-limit"),
            (self.split == "files" and not self.val_classes,
             "split 'files' needs a validation class list (--val-classes FILE)"),
        )
        for bad, message in problems:
            if bad:
                raise UserError(message)

    @property
    def has_validation(self) -> bool:
        return self.split != "none" and self.val_every > 0 and self.val_episodes > 0

    # -- JSON ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["preprocess"] = self.preprocess.to_dict()
        d["data"] = list(self.data)
        d["rotations"] = list(self.rotations)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys (from newer versions) are ignored."""
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        if "preprocess" in kw:
            kw["preprocess"] = Preprocess.from_dict(kw["preprocess"])
        if "data" in kw:
            kw["data"] = tuple(kw["data"])
        if "rotations" in kw:
            kw["rotations"] = tuple(kw["rotations"])
        return cls(**kw)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        return cls.from_dict(json.loads(text))

    def with_(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes`` applied."""
        return replace(self, **changes)
