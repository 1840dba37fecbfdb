"""The engine side of labeling: :class:`SessionHost` owns the engine's ``LabelingSession``
and is only ever called inside jobs on the labeling controller's one-thread pool, so session
calls are serialised (the session is not thread-safe) and never run on the UI thread.

Its methods are the jobs: :meth:`SessionHost.label` is a generator of
:class:`~fewshot_studio.progress.Progress` (run in a ``GeneratorWorker``), the others plain
functions returning the new predictions (run in a ``FunctionWorker``). After each run and
relabel it asks the session which class examples look like another class
(``suspicious_examples``) and reports them through ``on_suspicious``: example -> that class.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from fewshot_studio.data.scan import QueryScan
from fewshot_studio.engine.api import LabelSettings, Prediction
from fewshot_studio.errors import UserError
from fewshot_studio.gui.saved_predictions import (
    SavedPredictions,
    Stamp,
    file_stamp,
    stamp_matches,
)
from fewshot_studio.progress import Progress

log = logging.getLogger(__name__)


class Embedding(Protocol):
    """What the controller uses of the session's ``EmbeddingPipeline``."""

    def feature_id(self) -> str: ...


class Session(Protocol):
    """What the controller uses of :class:`~fewshot_studio.engine.session.LabelingSession`
    (tests stand in for it with fakes that implement all of it). Called on the pool thread
    only."""

    settings: LabelSettings
    backend: Any
    model_id: str  # "<checkpoint identity>:<feature format>"
    embedding: Embedding  # its feature_id(): the cache key of the features a run computed

    def prepare(self) -> Any: ...
    def set_support(self, classes: Mapping[str, Sequence[Path]]) -> None: ...
    def support(self) -> dict[str, list[Path]]: ...
    def run(self, query_paths: Sequence[Path]) -> Iterator[Progress]: ...
    def relabel(self) -> list[Prediction]: ...
    def predictions(self) -> list[Prediction]: ...
    def set_settings(self, settings: LabelSettings) -> list[Prediction]: ...
    def correct(self, paths: Sequence[Path], label: str | None) -> list[Prediction]: ...
    def corrections(self) -> dict[Path, str]: ...
    def suspicious_examples(self) -> dict[Path, str]: ...
    def close(self) -> None: ...


SessionFactory = Callable[[str, LabelSettings, Path | None], Session]
LabelResult = tuple[list[Prediction], str, dict[Path, Stamp], str]
"""A finished run: predictions, the checkpoint identity, the file stamps of the images, and
the cache key the run's features are stored under (the session's ``embedding.feature_id()``:
it names int8 and test-time augmentation, and a fine-tuned copy; what the embedding map and
find-similar read)."""


def default_factory(checkpoint: str, settings: LabelSettings, cache_path: Path | None) -> Any:
    from fewshot_studio.engine.session import LabelingSession

    return LabelingSession(checkpoint, settings=settings, cache_path=cache_path)


def describe_error(e: BaseException) -> str:
    if isinstance(e, UserError):
        return str(e)
    return f"{type(e).__name__}: {e}"


class SessionHost:
    """Holds the session (created on first use, replaced when the checkpoint or the cache
    changes). ``on_backend(text)`` and ``on_suspicious({example: class})`` are called from the
    pool thread (the controller passes signal emitters: queued to the UI thread)."""

    def __init__(self, factory: SessionFactory,
                 on_backend: Callable[[str], None],
                 on_suspicious: Callable[[dict[Path, str]], None]) -> None:
        self.factory = factory
        self.on_backend, self.on_suspicious = on_backend, on_suspicious
        self.session: Session | None = None
        self._key: tuple[str, Path | None] | None = None

    @staticmethod
    def warm_up() -> None:
        """Import the engine and its runtimes (C extensions hold the GIL while loading)."""
        import importlib

        for name in ("fewshot_studio.engine.session", "fewshot_studio.engine.export",
                     "fewshot_studio.models", "onnxruntime"):
            with contextlib.suppress(ImportError):
                importlib.import_module(name)

    def _session_for(self, checkpoint: str, cache_path: Path | None,
                     settings: LabelSettings) -> Session:
        key = (checkpoint, cache_path)
        if self.session is None or self._key != key:
            if self.session is not None:
                self.session.close()
            self.session = None
            self.session = self.factory(checkpoint, settings, cache_path)
            self._key = key
            self.session.prepare()  # ONNX export / runtime start, under "Loading model"
            self.on_backend(str(self.session.backend))
        elif self.session.settings != settings:
            self.session.set_settings(settings)
        return self.session

    def label(self, checkpoint: str, cache_path: Path | None, settings: LabelSettings,
              support: dict[str, list[Path]], paths: list[Path],
              corrections: dict[Path, str]) -> Iterator[Progress]:
        """Label ``paths`` (a generator of progress; its return value: a
        :data:`LabelResult`)."""
        if self.session is None or self._key != (checkpoint, cache_path):
            yield Progress(0, None, f"Loading model {Path(checkpoint).stem}…")
        s = self._session_for(checkpoint, cache_path, settings)
        s.set_support(support)
        yield from s.run(paths)
        self.on_backend(str(s.backend))
        preds = self._reconcile(s, corrections, support) or s.predictions()
        self._check_support(s, support)
        ident = s.model_id.split(":")[0]
        return preds, ident, {p: file_stamp(p) for p in paths}, s.embedding.feature_id()

    @staticmethod
    def _reconcile(s: Session, wanted: dict[Path, str],
                   support: dict[str, list[Path]]) -> list[Prediction] | None:
        """Make the session's corrections equal ``wanted`` (dropping unknown class names)."""
        wanted = {p: lab for p, lab in wanted.items() if lab in support}
        have = s.corrections()
        preds = None
        for p in [p for p in have if p not in wanted]:
            preds = s.correct([p], None)
        by_label: dict[str, list[Path]] = {}
        for p, lab in wanted.items():
            if have.get(p) != lab:
                by_label.setdefault(lab, []).append(p)
        for lab, ps in by_label.items():
            preds = s.correct(ps, lab)
        return preds

    def correct(self, changes: dict[Path, str | None]) -> list[Prediction] | None:
        s = self.session
        assert s is not None
        preds = None
        by_label: dict[str | None, list[Path]] = {}
        for p, lab in changes.items():
            by_label.setdefault(lab, []).append(p)
        for lab, ps in by_label.items():
            preds = s.correct(ps, lab)
        if s.settings.corrections_join_support:  # the support changed
            self._check_support(s)
        return preds

    def set_settings(self, settings: LabelSettings) -> list[Prediction]:
        assert self.session is not None
        preds = self.session.set_settings(settings)
        self._check_support(self.session)
        return preds

    def relabel(self, support: dict[str, list[Path]],
                corrections: dict[Path, str]) -> list[Prediction]:
        s = self.session
        assert s is not None
        s.set_support(support)
        preds = s.relabel()  # cached features: only new examples are embedded
        preds = self._reconcile(s, corrections, support) or preds
        self._check_support(s, support)
        return preds

    def _check_support(self, s: Session, support: Mapping[str, list[Path]] | None = None
                       ) -> None:
        """Report the session's suspicious class examples, keyed by the paths the class
        panel holds (``support``: the GUI's; else the session's)."""
        try:
            found = s.suspicious_examples()
        except Exception:  # a hint, not worth losing the labels over
            log.exception("checking the class examples failed")
            return
        if support is None:
            support = s.support()
        ours = {os.path.abspath(p): p for ps in support.values() for p in ps}
        self.on_suspicious({ours.get(os.path.abspath(p), Path(p)): lab
                            for p, lab in found.items()})

    def close(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None


# -- folder scans, saved predictions and checkpoint checks (the global pool) -------------------
def scan_query(root: Path, recursive: bool, exclude: Collection[Path] = ()) -> QueryScan:
    """The query folder's images, leaving out the files ``exclude`` (the class examples: a
    support folder inside the query folder is not labeled, as in the CLI). Compared by real
    path, with one ``realpath`` per folder, not per image: O(images + examples)."""
    from fewshot_studio.data.scan import scan_images

    scan = scan_images(root, recursive=recursive)
    if not exclude:
        return scan
    skip = {os.path.realpath(p) for p in exclude}
    real_dirs: dict[str, str] = {}
    keep = []
    for p in scan:
        folder, name = os.path.split(str(p))
        real = real_dirs.get(folder)
        if real is None:
            real = real_dirs[folder] = os.path.realpath(folder)
        if os.path.join(real, name) not in skip:
            keep.append(p)
    scan[:] = keep
    return scan


def unreadable_note(scan: QueryScan) -> str:
    """A status line naming the sub-folders a scan could not read ("" when none)."""
    if not scan.unreadable:
        return ""
    folder, reason = scan.unreadable[0]
    more = f" and {len(scan.unreadable) - 1} more" if len(scan.unreadable) > 1 else ""
    return f"Cannot read folder {folder} ({reason}){more}: its images are not in the gallery"


def checkpoint_identity(checkpoint: str, cache_path: Path | None) -> str:
    """The checkpoint's identity as the embedding cache computes it (SHA-256 of the file,
    remembered in the cache); "" if it cannot be read. Pool threads only."""
    from fewshot_studio.engine.cache import EmbeddingCache
    from fewshot_studio.paths import resolve_checkpoint

    try:
        path = resolve_checkpoint(checkpoint)
        with EmbeddingCache(cache_path) as cache:
            return cache.checkpoint_identity(path)
    except (UserError, OSError):
        return ""


def current_predictions(saved: SavedPredictions, on_disk: set[str], checkpoint_id: str
                        ) -> tuple[list[Prediction], dict[Path, Stamp], str, str]:
    """The saved predictions that still hold (same checkpoint, file unchanged), their stamps,
    a one-line account for the status bar and the cache key of their features ("" when none
    hold). Pool threads only (one stat per image)."""
    n = len(saved.predictions)
    if not checkpoint_id or checkpoint_id != saved.checkpoint_id:
        return [], {}, (f"{n} saved labels not shown: they were made with another checkpoint "
                        "(press Label)"), ""
    keep: list[Prediction] = []
    stamps: dict[Path, Stamp] = {}
    for p, stamp in zip(saved.predictions, saved.stamps, strict=True):
        if str(p.path) in on_disk and stamp_matches(stamp, file_stamp(p.path)):
            keep.append(p)
            stamps[p.path] = stamp
    note = f"Restored {len(keep)} saved labels"
    if len(keep) < n:
        note += f"; {n - len(keep)} not shown: the images changed or are gone (press Label)"
    return keep, stamps, note, saved.feature_id if keep else ""


def check_checkpoint_file(name: str) -> str:
    """"" if checkpoint ``name`` loads (metadata, the weights' names and shapes, finite
    values), else a one-line reason."""
    from fewshot_studio.io.checkpoint import load_checkpoint
    from fewshot_studio.paths import resolve_checkpoint

    try:
        load_checkpoint(resolve_checkpoint(name))
    except UserError as e:
        return str(e)
    except Exception as e:  # an unreadable file, whatever the reason: name it
        return describe_error(e)
    return ""


def finetune_refusal(name: str) -> str:
    """Why checkpoint ``name`` cannot be fine-tuned on the examples (Label > Fine-tune on my
    examples; :func:`~fewshot_studio.models.finetune.can_finetune`), "" when it can or when
    it cannot be read (:func:`check_checkpoint_file` names that). Pool threads only."""
    from fewshot_studio.io.checkpoint import read_metadata
    from fewshot_studio.models import build_model
    from fewshot_studio.models.finetune import can_finetune
    from fewshot_studio.paths import resolve_checkpoint

    try:  # the metadata names the model: its weights are not read
        model = build_model(read_metadata(resolve_checkpoint(name))["model"])
    except Exception:  # unreadable: check_checkpoint_file reports it
        return ""
    if can_finetune(model):
        return ""
    return (f"Not available for this {model.method_name} checkpoint: only ProtoNet and "
            "Relation Network checkpoints with a built-in backbone can be fine-tuned")
