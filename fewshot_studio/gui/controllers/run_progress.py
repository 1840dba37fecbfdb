"""What the status bar says about a labeling run: a progress line per batch and the summary
at the end. Before the first image is done (loading the model, embedding the class examples)
the total is reported as 0 (a busy bar) with what is happening; the rate clock starts at the
first embedded batch, so neither the rate nor the ETA counts the load."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from fewshot_studio.engine.api import Prediction, Status
from fewshot_studio.progress import EtaEstimator, Progress, format_seconds

# The engine's messages before the first image is done, as the status bar says them.
PHASES = {"embedding examples": "Reading the class examples…"}
# The engine's message while it fine-tunes a copy of the model on the examples (Label >
# Fine-tune on my examples): its own determinate phase, in optimiser steps, before the images.
FINETUNING = "fine-tuning on the examples"


class RunProgress:
    """One run's clock: :meth:`report` per progress item, :meth:`summary` at the end."""

    def __init__(self) -> None:
        self._eta = EtaEstimator()
        self._start = time.perf_counter()
        self._first_batch = 0.0

    def report(self, p: Progress) -> tuple[int, int, str]:
        """``(done, total, text)``: total 0 while nothing is done yet (a busy bar), else
        "123/2000 · 45 img/s · ETA 00:31"; while fine-tuning, its steps ("Fine-tuning on your
        examples… 12/45"; the image clock has not started)."""
        if p.message == FINETUNING:
            steps = f" {p.done}/{p.total}" if p.total else ""
            return p.done, p.total or 0, f"Fine-tuning on your examples…{steps}"
        if not p.done:
            return 0, 0, PHASES.get(p.message, p.message) or "Starting…"
        if not self._first_batch:
            self._first_batch = time.perf_counter()
        self._eta.update(p.done)  # the first call only sets the starting point
        parts = [f"{p.done}/{p.total}" if p.total else str(p.done)]
        if self._eta.rate:
            parts.append(f"{self._eta.rate:.0f} img/s")
        eta = self._eta.eta(p.done, p.total)
        if eta is not None:
            parts.append(f"ETA {format_seconds(eta)}")
        return p.done, p.total or 0, " · ".join(parts)

    def summary(self, preds: Sequence[Prediction]) -> dict[str, Any]:
        """labeled, unknown, errors, corrected, seconds, load_seconds (model load and class
        examples, before the first image; not part of the rate)."""
        now = time.perf_counter()
        return {
            "labeled": sum(p.status == Status.OK for p in preds),
            "unknown": sum(p.status == Status.UNKNOWN for p in preds),
            "errors": sum(p.status == Status.ERROR for p in preds),
            "corrected": sum(p.corrected for p in preds),
            "seconds": now - self._start,
            "load_seconds": (self._first_batch or now) - self._start,
        }
