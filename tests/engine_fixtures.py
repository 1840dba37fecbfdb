"""Generated fixtures for the engine, export, ONNX and CLI tests: a tiny random-init
checkpoint and folders of images whose classes are easy for any embedding (distinct colours).

    from engine_fixtures import make_checkpoint, make_label_folders
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

COLOURS = {"red": (215, 35, 35), "green": (35, 190, 50), "blue": (40, 50, 220)}


def make_checkpoint(path: Path, image_size: int = 32, hidden: int = 16, seed: int = 0,
                    channels: int = 3) -> Path:
    """A random-init Conv4 ProtoNet checkpoint (small input) written with save_checkpoint."""
    from fewshot_studio.data.preprocess import Preprocess
    from fewshot_studio.io.checkpoint import Checkpoint, save_checkpoint
    from fewshot_studio.models import create_backbone, create_method, model_spec

    torch.manual_seed(seed)
    cfg = {"in_channels": channels, "image_size": image_size, "hidden": hidden}
    model = create_method("protonet", create_backbone("conv4", **cfg))
    pre = Preprocess(image_size, channels, (0.5,) * channels, (0.25,) * channels)
    ckpt = Checkpoint(model=model_spec(model, "conv4", cfg), preprocess=pre,
                      state_dict=model.state_dict(), name=path.stem,
                      evaluation={"test 5w1s": {"accuracy": 0.5, "ci95": 0.01,
                                                "episodes": 10}})
    return save_checkpoint(path, ckpt)


def colour_image(name: str, idx: int, size: tuple[int, int] = (48, 36),
                 noise: float = 18.0) -> Image.Image:
    """A noisy solid-colour RGB image of class ``name``."""
    rng = np.random.default_rng(zlib.crc32(f"{name}/{idx}".encode()))
    base = np.array(COLOURS[name], np.float32)[None, None, :]
    a = base + rng.normal(0, noise, (size[1], size[0], 3))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "RGB")


def make_support(root: Path, per_class: int = 3) -> dict[str, list[Path]]:
    """``root/<colour>/<i>.png`` for each colour; returns {class: paths}."""
    out: dict[str, list[Path]] = {}
    for name in COLOURS:
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        paths = []
        for i in range(per_class):
            p = d / f"{i}.png"
            colour_image(name, 100 + i).save(p)
            paths.append(p)
        out[name] = paths
    return out


def make_queries(root: Path, per_class: int = 4) -> dict[str, str]:
    """Good query images (JPEG and PNG, one in a sub-folder, one with a unicode name);
    returns {relative posix path: true class}."""
    truth: dict[str, str] = {}
    root.mkdir(parents=True, exist_ok=True)
    (root / "sub").mkdir(exist_ok=True)
    for name in COLOURS:
        for i in range(per_class):
            rel = f"{name}_{i}.jpg" if i % 2 == 0 else f"{name}_{i}.png"
            if i == 3:
                rel = f"sub/{name}_{i}.jpg"
            colour_image(name, i).save(root / rel, quality=92) if rel.endswith(".jpg") else \
                colour_image(name, i).save(root / rel)
            truth[rel] = name
    colour_image("green", 99).save(root / "grün_ñ_图.png")
    truth["grün_ñ_图.png"] = "green"
    return truth


def make_label_folders(root: Path, per_class: int = 4) -> tuple[Path, Path, dict[str, str],
                                                                  dict[str, str]]:
    """Support + query folders with planted bad and odd files and non-images.

    Returns ``(support_root, query_root, truth, bad)``: ``truth`` = {relative path: class}
    for the good colour images, ``bad`` = {relative path: expected reason substring}.
    Odd-but-readable files (CMYK, 16-bit, palette+alpha, LA, EXIF-rotated) are also there,
    ``cmyk.jpg`` being pure red. A hidden image and a .txt file must be ignored.
    """
    from fixtures_data import write_bad_files, write_odd_files

    support_root, query_root = root / "support", root / "query"
    make_support(support_root)
    truth = make_queries(query_root, per_class)
    bad = write_bad_files(query_root)
    (query_root / "fake.jpg").write_bytes(b"<html>not a jpeg</html>")
    bad["fake.jpg"] = "not an image"
    write_odd_files(query_root / "odd")
    (query_root / ".hidden.jpg").write_bytes(b"ignored")
    (query_root / "notes.txt").write_text("not an image")
    return support_root, query_root, truth, bad


def odd_names() -> list[str]:
    from fixtures_data import odd_file_bytes

    return [f"odd/{n}" for n in sorted(odd_file_bytes())]


def sample_predictions(root: Path) -> list:
    """Four predictions under ``root`` for the export tests: ok, unknown (a unicode name in a
    sub-folder), error and corrected, not in path order."""
    from fewshot_studio.engine.api import Prediction, Status

    top = (("cat", 0.7), ("dog", 0.2), ("bird", 0.1))
    return [
        Prediction(root / "z.jpg", "cat", 0.7, 0.5, Status.OK, top),
        Prediction(root / "a" / "ünï 图.png", None, 0.4, 0.1, Status.UNKNOWN,
                   (("dog", 0.4), ("cat", 0.3), ("bird", 0.3))),
        Prediction(root / "b.jpg", None, 0.0, 0.0, Status.ERROR, (), "truncated file"),
        Prediction(root / "c.jpg", "dog", 1.0, 1.0, Status.OK, top, "", True),
    ]
