"""A tiny generated few-shot dataset for the training tests: "glyph" classes of a few random
strokes each, every image jittered (rotation, shift, stroke width) with pixel noise, so that an
untrained network is far from perfect and meta-training visibly helps.

    from fixtures_train import make_glyphs

and ``one_thread``, an autouse fixture: import it into a test module to run its tests with one
torch thread.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw


def make_glyphs(root: Path, n_classes: int = 16, n_per_class: int = 10, size: int = 28,
                seed: int = 0, nested: bool = False) -> list[str]:
    """Write ``root/glyphNN/MM.png`` (or ``root/groupK/glyphNN/...`` when ``nested``);
    returns the class names."""
    rng = np.random.default_rng(seed)
    names = []
    big = 4 * size
    for c in range(n_classes):
        strokes = rng.uniform(0.15, 0.85, (3, 4)) * big
        name = f"group{c % 4}/glyph{c:02d}" if nested else f"glyph{c:02d}"
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            img = Image.new("L", (big, big), 255)
            draw = ImageDraw.Draw(img)
            width = int(rng.integers(6, 12))
            for x0, y0, x1, y1 in strokes:
                draw.line([float(x0), float(y0), float(x1), float(y1)], fill=0, width=width)
            shift = tuple(int(v) for v in rng.integers(-12, 13, 2))
            img = img.rotate(float(rng.uniform(-20, 20)), fillcolor=255, translate=shift)
            img = img.resize((size, size), Image.Resampling.BILINEAR)
            a = np.asarray(img, np.float32) + rng.normal(0, 25, (size, size))
            Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "L").save(d / f"{i:02d}.png")
        names.append(name)
    return names


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny tensors gain nothing from intra-op threads, and on a loaded 2-core machine
    spinning OpenMP threads slow these tests down many times over."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
