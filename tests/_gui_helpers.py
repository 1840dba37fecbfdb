"""Shared fixtures-as-functions for the GUI tests and benchmarks/ui_stall.py: a tiny
random-init checkpoint and generated class-coloured images (nothing downloaded)."""

from __future__ import annotations

from pathlib import Path

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
