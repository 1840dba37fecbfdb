"""Run long work off the UI thread: a :class:`GeneratorWorker` drives a generator (of
:class:`~fewshot_studio.progress.Progress`, usually) in a ``QThreadPool`` and reports through
Qt signals, which arrive on the UI thread as queued events. Cancelling is cooperative: the
worker stops at the next ``yield`` and closes the generator (its ``finally`` blocks run).
A :class:`FunctionWorker` runs a plain function the same way (same signals, same error
handling), for work that reports no progress.

Modelled on napari/superqt's ``GeneratorWorker``.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Generator, Iterator
from typing import Any, ClassVar, Self

import shiboken6
from PySide6.QtCore import QObject, QRunnable, QThreadPool, Signal

BACKGROUND_NICE = 5


def lower_thread_priority(nice: int = BACKGROUND_NICE) -> bool:
    """Make the calling thread (and threads it starts later, which inherit it: the engine's
    decoders, ONNX Runtime's pool) yield the CPU to the UI thread. Linux nice values are per
    thread; raising one needs no privileges. No-op (False) where unsupported."""
    if not hasattr(os, "setpriority") or not sys.platform.startswith("linux"):
        return False
    try:
        tid = threading.get_native_id()
        current = os.getpriority(os.PRIO_PROCESS, tid)
        if current < nice:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
        return True
    except OSError:
        return False


def bind_to(owner: QObject, fn: Callable[[Any], None]) -> Callable[[Any], None]:
    """``fn``, made to do nothing once ``owner`` is deleted: a job that outlives its window
    (closed while the job ran) then reports to no one instead of emitting a deleted
    object's signal ("Signal source has been deleted")."""
    def call(value: Any) -> None:
        if shiboken6.isValid(owner):
            fn(value)
    return call


class WorkerSignals(QObject):
    """``started``; ``yielded(value)`` per item; then exactly one of ``finished(return
    value)``, ``errored(exception)`` or ``cancelled``; ``done`` always comes last."""

    started = Signal()
    yielded = Signal(object)
    finished = Signal(object)
    errored = Signal(object)
    cancelled = Signal()
    done = Signal()


class Worker(QRunnable):
    """What every worker shares: signals, cancelling, starting in a pool, and the error and
    ``done`` handling around :meth:`_body`. ``thread_ident`` records the thread the body ran
    on (for tests and assertions)."""

    _live: ClassVar[set[Worker]] = set()  # keep Python wrappers alive until done

    def __init__(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self.setAutoDelete(False)
        self.signals = WorkerSignals()
        self._func, self._args, self._kwargs = func, args, kwargs
        self._abort = threading.Event()
        self.thread_ident: int | None = None
        self.is_done = False

    # convenience aliases, as in superqt
    @property
    def yielded(self) -> Any:
        return self.signals.yielded

    @property
    def finished(self) -> Any:
        return self.signals.finished

    @property
    def errored(self) -> Any:
        return self.signals.errored

    def cancel(self) -> None:
        """Ask the worker to stop (before it starts; a generator also at its next yield)."""
        self._abort.set()

    def start(self, pool: QThreadPool | None = None) -> Self:
        Worker._live.add(self)
        self.signals.done.connect(lambda: Worker._live.discard(self))
        (pool or QThreadPool.globalInstance()).start(self)
        return self

    def run(self) -> None:  # in the pool thread
        self.thread_ident = threading.get_ident()
        lower_thread_priority()
        sig = self.signals
        try:
            if self._abort.is_set():
                sig.cancelled.emit()
                return
            sig.started.emit()
            self._body(sig)
        except BaseException as e:
            sig.errored.emit(e)
        finally:
            self.is_done = True
            sig.done.emit()

    def _body(self, sig: WorkerSignals) -> None:
        raise NotImplementedError


class GeneratorWorker(Worker):
    """Run ``func(*args, **kwargs)`` (a generator function) in a thread pool: each yielded
    value is a ``yielded`` signal, the generator's return value ``finished``; a cancel stops
    it at its next yield and closes it."""

    def __init__(self, func: Callable[..., Iterator[Any]], *args: Any, **kwargs: Any) -> None:
        super().__init__(func, *args, **kwargs)

    def _body(self, sig: WorkerSignals) -> None:
        gen = self._func(*self._args, **self._kwargs)
        while True:
            if self._abort.is_set():
                if isinstance(gen, Generator):
                    gen.close()
                sig.cancelled.emit()
                return
            try:
                value = next(gen)
            except StopIteration as stop:
                sig.finished.emit(stop.value)
                return
            sig.yielded.emit(value)


class FunctionWorker(Worker):
    """Run a plain function ``func(*args, **kwargs)`` in a thread pool: ``finished`` carries
    its return value, ``errored`` what it raised; it yields nothing, and a cancel only takes
    effect before it starts."""

    def _body(self, sig: WorkerSignals) -> None:
        sig.finished.emit(self._func(*self._args, **self._kwargs))
