"""Shared fixtures-as-functions for the GUI tests and benchmarks/ui_stall.py: a tiny
random-init checkpoint and generated class-coloured images (nothing downloaded)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
from PIL import Image

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220)}


def tiny_checkpoint(path: Path, image_size: int = 32, seed: int = 0) -> Path:
    """A random-init ProtoNet + Conv4 (RGB, ``image_size`` px) saved as a real checkpoint."""
    import torch

    from fewshot_studio.data.preprocess import Preprocess
    from fewshot_studio.io.checkpoint import Checkpoint, save_checkpoint
    from fewshot_studio.models import build_model, create_backbone, create_method, model_spec

    torch.manual_seed(seed)
    cfg = {"in_channels": 3, "image_size": image_size, "hidden": 16}
    model = create_method("protonet", create_backbone("conv4", **cfg))
    spec = model_spec(model, "conv4", cfg)
    build_model(spec)  # the spec must round-trip
    pre = Preprocess(image_size=image_size, channels=3, mean=(0.5, 0.5, 0.5),
                     std=(0.25, 0.25, 0.25), resize="squash")
    ckpt = Checkpoint(model=spec, preprocess=pre, state_dict=model.state_dict(), name="tiny")
    return save_checkpoint(path, ckpt)


def make_image(path: Path, color: tuple[int, int, int], seed: int, size: int = 48) -> Path:
    rng = np.random.default_rng(seed)
    a = np.clip(np.array(color, dtype=np.float32) + rng.normal(0, 18, (size, size, 3)), 0, 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a.astype(np.uint8)).save(path)
    return path


def make_dataset(root: Path, n_support: int = 3, n_query: int = 4,
                 colors: dict[str, tuple[int, int, int]] | None = None
                 ) -> tuple[dict[str, list[Path]], Path]:
    """``root/support/<class>/*.png`` and ``root/query/<class>_<i>.png`` (query files are
    flat, named after their true class). Returns (support dict, query folder)."""
    colors = colors or COLORS
    support: dict[str, list[Path]] = {}
    seed = 0
    for name, c in colors.items():
        support[name] = []
        for i in range(n_support):
            seed += 1
            support[name].append(make_image(root / "support" / name / f"s{i}.png", c, seed))
        for i in range(n_query):
            seed += 1
            make_image(root / "query" / f"{name}_{i:04d}.png", c, seed)
    return support, root / "query"


def red_green_images(root: Path, n_query: int) -> dict:
    """Two examples each of a red and a green class under ``root/support``, and ``n_query``
    red query images under ``root/query``: ``{"support": {class: [paths]}, "query": dir}``."""
    colors = {"red": (220, 40, 40), "green": (40, 180, 60)}
    support = {n: [make_image(root / "support" / n / f"{n}{i}.png", c, 10 * k + i, 24)
                   for i in range(2)]
               for k, (n, c) in enumerate(colors.items())}
    for i in range(n_query):
        make_image(root / "query" / f"q{i}.png", colors["red"], 50 + i, 24)
    return {"support": support, "query": root / "query"}


def shown_window(qtbot, **kwargs):
    """A shown ``MainWindow(restore_state=False, **kwargs)`` whose error dialogs fail the test
    and which discards unsaved work without asking; close it when done."""
    import pytest

    from fewshot_studio.gui.main_window import MainWindow

    w = MainWindow(restore_state=False, **kwargs)
    w.show_error = lambda *a: pytest.fail(f"unexpected error dialog: {a}")
    w.ask_unsaved = lambda: "discard"
    qtbot.addWidget(w)
    w.show()
    return w


class FakeSession:
    """Stands in for ``LabelingSession`` in GUI tests (no model, no cache). Subclasses say
    what each image gets in :meth:`guess`; a corrected image gets its label at confidence 1.0.
    ``run`` yields one batch with every prediction; ``prepare`` returns :attr:`backend`."""

    backend_info = ("torch", "cpu")

    def __init__(self, checkpoint: str, settings, cache_path: Path | None) -> None:
        from fewshot_studio.engine.api import BackendInfo

        self.checkpoint, self.settings = checkpoint, settings
        self.backend = BackendInfo(*self.backend_info)
        self.model_id = "fake:v2"
        self.embedding = SimpleNamespace(feature_id=lambda: self.model_id)
        self.classes: dict[str, list[Path]] = {}
        self.names: list[str] = []
        self.paths: list[Path] = []
        self.corr: dict[Path, str] = {}

    def guess(self, index: int, path: Path):
        """The prediction of the ``index``-th image at ``path`` (not corrected)."""
        raise NotImplementedError

    def prediction(self, index: int, path: Path):
        from fewshot_studio.engine.api import Prediction, Status

        if path in self.corr:
            lab = self.corr[path]
            return Prediction(path, lab, 1.0, 1.0, Status.OK, ((lab, 1.0),), "", True)
        return self.guess(index, path)

    def prepare(self):
        return self.backend

    def set_support(self, classes: dict) -> None:
        self.classes = {k: list(v) for k, v in classes.items()}
        self.names = list(classes)

    def support(self) -> dict[str, list[Path]]:
        return {k: list(v) for k, v in self.classes.items()}

    def suspicious_examples(self) -> dict[Path, str]:
        return {}

    def predictions(self) -> list:
        return [self.prediction(i, p) for i, p in enumerate(self.paths)]

    def run(self, paths: list[Path]):
        from fewshot_studio.progress import Progress

        self.paths = list(paths)
        yield Progress(len(paths), len(paths), "", payload=self.predictions())

    def relabel(self) -> list:
        return self.predictions()

    def set_settings(self, settings) -> list:
        self.settings = settings
        return self.predictions()

    def correct(self, paths: list[Path], label: str | None) -> list:
        for p in paths:
            if label is None:
                self.corr.pop(p, None)
            else:
                self.corr[p] = label
        return self.predictions()

    def corrections(self) -> dict[Path, str]:
        return dict(self.corr)

    def close(self) -> None:
        pass


class RedSession(FakeSession):
    """Every image is "red" at 0.9."""

    def guess(self, index: int, path: Path):
        from fewshot_studio.engine.api import Prediction, Status
        return Prediction(path, "red", 0.9, 0.5, Status.OK, (("red", 0.9),))


def window_with_classes(qtbot, support: dict[str, list[Path]], query: Path, rows: int,
                        session_factory=RedSession):
    """A shown window whose project has ``support``'s classes and ``query`` as its folder,
    once the gallery lists ``rows`` images."""
    from fewshot_studio.gui import project_io as pio
    w = shown_window(qtbot, session_factory=session_factory)
    w.project.apply(pio.Project(
        classes=[pio.ClassSpec(n, pio.PALETTE[i], ps) for i, (n, ps) in
                 enumerate(support.items())],
        query_folder=query, checkpoint="fake"))
    qtbot.waitUntil(lambda: w.gallery_model.rowCount() == rows, timeout=10_000)
    return w


def wait_idle(qtbot, w) -> None:
    """Wait until the window's engine thread is idle, with no run or relabel pending, then let
    the queued result signals land."""
    lab = w.labeling
    qtbot.waitUntil(lambda: lab.pool.activeThreadCount() == 0 and not lab.busy
                    and not lab._relabel_timer.isActive(), timeout=30_000)
    qtbot.wait(50)


def label_and_wait(qtbot, w) -> None:
    """Press Label and wait for the run to finish and its results to land."""
    with qtbot.waitSignal(w.labeling.run_finished, timeout=60_000):
        assert w.labeling.label() is not None
    wait_idle(qtbot, w)


def drop_urls(target, paths) -> bool:
    """Send DragEnter, DragMove and Drop with ``paths`` as URLs (what a file manager sends)
    to ``target``; True if each was accepted (False at the first refusal)."""
    from PySide6.QtCore import QMimeData, QPoint, QPointF, Qt, QUrl
    from PySide6.QtGui import QDragEnterEvent, QDragMoveEvent, QDropEvent
    from PySide6.QtWidgets import QApplication

    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(p)) for p in paths])
    pos = QPoint(target.width() // 2, target.height() // 2)
    act = Qt.DropAction.CopyAction
    btn, mod = Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier
    enter = QDragEnterEvent(pos, act, mime, btn, mod)
    QApplication.sendEvent(target, enter)
    if not enter.isAccepted():
        return False
    move = QDragMoveEvent(pos, act, mime, btn, mod)
    QApplication.sendEvent(target, move)
    if not move.isAccepted():
        return False
    drop = QDropEvent(QPointF(pos), act, mime, btn, mod)
    QApplication.sendEvent(target, drop)
    return drop.isAccepted()
