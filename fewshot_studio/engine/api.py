"""The labeling engine's public types, shared by the CLI (``fewshot-studio label``) and the
GUI. Qt-free. The implementation lives in :mod:`fewshot_studio.engine.session`."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path


class Status(StrEnum):
    OK = "ok"
    UNKNOWN = "unknown"
    ERROR = "error"


ADAPT_MODES = ("none", "head", "auto", "finetune")
UNKNOWN_RULES = ("adaptive", "threshold")


@dataclass(frozen=True)
class LabelSettings:
    """User-facing knobs.

    ``unknown_rule``: how an image becomes ``unknown``. "adaptive" (opt-in: the app's Label >
    Adaptive unknown rule, ``label --unknown-rule adaptive``) reads the rule off the support
    set, from held-out examples (each class's examples left out in turn, up to 5 folds): an
    image is unknown when its top
    logit (the prototypes': how typical of a known class it is) is below what all but
    ``miss_rate`` of the held-out examples reach
    (split-conformal: an image of a known class is missed with probability <= ``miss_rate``),
    or when its top probability is below the level above which the held-out examples are
    right 90% of the time. "threshold": unknown when the top probability is below
    ``unknown_threshold``. With one example a class nothing can be held out, and "adaptive"
    falls back to the threshold.

    ``adapt``: "none" (prototypes), "head" (a logistic-regression head on the cached
    features, started from the prototypes: for many examples a class; methods whose features
    are vectors, i.e. ProtoNet) or "auto" (the head unless the prototypes are right on more
    held-out examples; prototypes with one example a class, and with ``transductive``, which
    refines prototypes). "finetune": prototypes of a copy of the model whose last backbone
    blocks are fine-tuned on the support images (:mod:`fewshot_studio.engine.finetuned`; at
    the next :meth:`~fewshot_studio.engine.session.LabelingSession.run`, which re-embeds the
    queries with it; seconds on the CPU; ProtoNet and Relation Network checkpoints).

    ``transductive``: refine prototypes with soft k-means over the queries (Ren et al. 2018).
    ``corrections_join_support``: a corrected query image becomes a support example of its
    class. ``device``: "auto" | "cpu" | "cuda". ``precision``: "fp32" | "int8" (ONNX Runtime
    on the CPU runs a statically quantised model: faster; features move (median 1.5% Conv4,
    13% EfficientNet-Lite0) but predictions nearly always stay, see
    benchmarks/int8_parity.py; elsewhere fp32). ``tta``: test-time augmentation, every image's
    features averaged over fixed views of it (:mod:`fewshot_studio.data.tta`: 8 for grayscale
    characters, the mirror image for photos); like ``precision`` it applies from the next
    embedding (the next labeling run)."""

    unknown_threshold: float = 0.55  # chosen on data: see benchmarks/unknown_threshold.py
    unknown_rule: str = "threshold"  # "adaptive" | "threshold": see benchmarks/open_set.py
    miss_rate: float = 0.1
    adapt: str = "auto"  # "none" | "head" | "auto" | "finetune": see benchmarks/adapt_head.py
    transductive: bool = False
    corrections_join_support: bool = True
    recursive: bool = True
    device: str = "auto"
    batch_size: int = 64
    precision: str = "fp32"
    tta: bool = False


@dataclass(frozen=True, init=False)
class Prediction:
    """One query image's result. ``path`` is absolute. ``top`` holds up to three
    ``(label, probability)`` pairs, best first. ``corrected``: the label was set by the user
    (then ``confidence`` is 1.0 and ``status`` OK)."""

    path: Path
    label: str | None
    confidence: float
    margin: float
    status: Status
    top: tuple[tuple[str, float], ...] = ()
    error: str = ""
    corrected: bool = False

    def __init__(self, path: Path, label: str | None, confidence: float, margin: float,
                 status: Status, top: tuple[tuple[str, float], ...] = (), error: str = "",
                 corrected: bool = False) -> None:
        # One write of the instance dict instead of a frozen dataclass's eight
        # object.__setattr__ calls: a relabel builds one per query (10k: ~11 ms -> ~6 ms).
        object.__setattr__(self, "__dict__", {
            "path": path, "label": label, "confidence": confidence, "margin": margin,
            "status": status, "top": top, "error": error, "corrected": corrected})


@dataclass(frozen=True)
class BackendInfo:
    """What actually runs: ``name`` "onnxruntime" | "torch"; ``device`` "cpu" | "cuda";
    ``detail`` e.g. the ONNX Runtime providers in use."""

    name: str
    device: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.name} ({self.device.upper()})" + (f", {self.detail}" if self.detail else "")


@dataclass
class EngineCounters:
    """Counts for tests and summaries: images embedded vs served from the cache; what went
    wrong with the embedding cache (the run goes on without it)."""

    embedded: int = 0
    cache_hits: int = 0
    errors: int = 0
    relabels: int = 0
    extra: dict[str, int] = field(default_factory=dict)
    cache_failures: int = 0
    """Embedding-cache errors (a full disk, a read-only or damaged file...): the first one
    switched the cache (or only its writes) off for the rest of the session. Non-zero: the
    summary reports :attr:`cache_disabled` and the CLI exits non-zero."""
    cache_disabled: str = ""
    """Why the cache is off or read-only for this session (one line); "" when it works."""
    cache_moved_aside: str = ""
    """Where a damaged cache file was moved (renamed, never deleted); "" if none."""
