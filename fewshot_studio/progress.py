"""Progress reports for long work. Long jobs (training, labeling, thumbnailing) are generators
that yield :class:`Progress`; the CLI renders them with :class:`ProgressBar`, the GUI forwards
them through a worker's signals and cancels cooperatively by closing the generator."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, TextIO, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Progress:
    """One step of a long job. ``total`` is None when unknown."""

    done: int
    total: int | None
    message: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    payload: Any = None  # results that stream out with the step (e.g. labeled rows)

    @property
    def fraction(self) -> float | None:
        if not self.total:
            return None
        return min(1.0, self.done / self.total)


def format_seconds(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))  # noqa: RUF046 (numpy floats round to floats)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class EtaEstimator:
    """Smoothed rate -> ETA. The first update only sets the starting point: the work before
    it (a slow first step, loading) does not count, nor does work done before this process
    started (a resumed run's first report is its step count so far)."""

    def __init__(self, smoothing: float = 0.3) -> None:
        self.start = time.perf_counter()
        self.smoothing = smoothing
        self._last_t = self.start
        self._last_done: int | None = None
        self.rate: float | None = None

    def update(self, done: int) -> None:
        now = time.perf_counter()
        if self._last_done is None:
            self._last_t, self._last_done = now, done
            return
        dt, dn = now - self._last_t, done - self._last_done
        if dt > 0 and dn > 0:
            inst = dn / dt
            self.rate = inst if self.rate is None else (
                self.smoothing * inst + (1 - self.smoothing) * self.rate
            )
            self._last_t, self._last_done = now, done

    def eta(self, done: int, total: int | None) -> float | None:
        if not total or not self.rate:
            return None
        return max(0.0, (total - done) / self.rate)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start


class ProgressBar:
    """A one-line terminal progress bar with rate, ETA and metrics (stderr)."""

    def __init__(self, label: str = "", stream: TextIO | None = None, width: int = 28,
                 unit: str = "it", min_interval: float = 0.1) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.width = width
        self.unit = unit
        self.min_interval = min_interval
        self.eta = EtaEstimator()
        self._last_draw = 0.0
        self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def update(self, p: Progress, force: bool = False) -> None:
        self.eta.update(p.done)
        now = time.perf_counter()
        if not force and now - self._last_draw < (self.min_interval if self._tty else 5.0):
            return
        self._last_draw = now
        frac = p.fraction
        bar = ""
        if frac is not None:
            fill = int(self.width * frac)
            bar = "[" + "#" * fill + "-" * (self.width - fill) + f"] {100 * frac:5.1f}% "
        count = f"{p.done}/{p.total}" if p.total else f"{p.done}"
        rate = f" {self.eta.rate:.1f} {self.unit}/s" if self.eta.rate else ""
        eta = self.eta.eta(p.done, p.total)
        eta_s = f" ETA {format_seconds(eta)}" if eta is not None else ""
        mets = " ".join(f"{k}={v:.4g}" for k, v in p.metrics.items())
        line = f"{self.label} {bar}{count}{rate}{eta_s} {mets} {p.message}".rstrip()
        if self._tty:
            self.stream.write("\r\x1b[K" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self._tty:
            self.stream.write("\n")
            self.stream.flush()


def run_with_bar(steps: Iterable[Progress], bar: ProgressBar, result_type: type[T]) -> T:
    """Drive a progress generator behind ``bar`` (closed at the end, also on error) and
    return the last payload of ``result_type`` it reported."""
    result: T | None = None
    try:
        for p in steps:
            bar.update(p, force=p.payload is not None)
            if isinstance(p.payload, result_type):
                result = p.payload
    finally:
        bar.close()
    if result is None:
        raise RuntimeError(f"the work ended without a {result_type.__name__}")
    return result
