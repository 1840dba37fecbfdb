"""The headless demo (``make run`` until the desktop app exists): meta-train a small ProtoNet
on Omniglot's background alphabets for about a minute, then measure it on the evaluation
alphabets it has never seen.

The Omniglot zips are found in ``$FEWSHOT_DATA/omniglot`` or ``<repo>/../shared/data/omniglot``.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

from fewshot_studio.errors import UserError
from fewshot_studio.progress import Progress, ProgressBar

OMNIGLOT_FILES = ("images_background.zip", "images_evaluation.zip")


def find_omniglot(data_dir: str | Path | None = None) -> Path:
    """The folder holding the Omniglot zips; UserError saying where it looked otherwise."""
    from fewshot_studio.data.datasets import default_data_dir

    base = Path(data_dir).expanduser() if data_dir else default_data_dir()
    folder = base / "omniglot"
    missing = [f for f in OMNIGLOT_FILES if not (folder / f).is_file()]
    if missing:
        raise UserError(f"the demo needs Omniglot: {', '.join(missing)} not found in {folder} "
                        "(set FEWSHOT_DATA to the folder that holds omniglot/)")
    return folder


def run_headless_demo(train_seconds: float = 45.0, eval_episodes: int = 200,
                      data_dir: str | Path | None = None, out: str | Path | None = None,
                      device: str = "auto") -> int:
    """Train ProtoNet (Conv4, 28 px, 20-way 5-shot, rotations as new classes) for
    ``train_seconds`` on images_background, then print its 5-way and 20-way 1-shot accuracy
    on images_evaluation (``eval_episodes`` episodes each, 15 queries per class). Returns the
    exit code; the checkpoint stays in ``out`` (default: the user cache directory)."""
    from fewshot_studio.data.preprocess import Preprocess
    from fewshot_studio.io.checkpoint import load_checkpoint
    from fewshot_studio.paths import user_cache_dir
    from fewshot_studio.training.config import TrainConfig
    from fewshot_studio.training.distributed import resolve_device
    from fewshot_studio.training.evaluate import evaluate_with_bar
    from fewshot_studio.training.train_data import load_eval_images
    from fewshot_studio.training.trainer import TrainResult, train

    try:
        folder = find_omniglot(data_dir)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run_dir = Path(out) if out else user_cache_dir() / "demo-run"
    shutil.rmtree(run_dir, ignore_errors=True)
    config = TrainConfig(
        method="protonet", backbone="conv4", preprocess=Preprocess(image_size=28, channels=1),
        data=(str(folder / "images_background.zip"),), split="groups", val_fraction=0.1,
        rotations=(0, 90, 180, 270), way=20, shot=5, query=5, episodes=100_000,
        schedule="constant", lr=1e-3, val_every=100, val_episodes=100, val_way=5, val_shot=1,
        seed=0, device=device, out=str(run_dir), name="demo-protonet", log_every=5,
        time_limit_s=train_seconds,
        description="headless demo: ProtoNet meta-trained for about a minute")
    print("FewShot Studio demo: meta-training a Prototypical Network (Conv4, 28 px) on the "
          f"Omniglot background alphabets for {train_seconds:.0f} s, then testing it on the "
          "20 evaluation alphabets it has never seen.")
    print(f"device: {resolve_device(device)}; data: {folder}")
    t0 = time.perf_counter()
    bar = ProgressBar("train", unit="ep")
    t_train = time.perf_counter()
    result: TrainResult | None = None
    try:
        for p in train(config):
            # a time-limited run: show the time left, not an ETA over 100,000 episodes
            left = max(0.0, train_seconds - (time.perf_counter() - t_train))
            bar.update(Progress(p.done, None, f"{left:.0f} s left", p.metrics),
                       force=p.payload is not None)
            if isinstance(p.payload, TrainResult):
                result = p.payload
    finally:
        bar.close()
    assert result is not None and result.best_path is not None
    print(f"trained {result.step} episodes in {time.perf_counter() - t0:.0f} s"
          + (f"; validation (held-out background alphabets) {result.best_val}"
             if result.best_val else ""))

    ckpt = load_checkpoint(result.best_path)
    dev = resolve_device(device)
    model = ckpt.build(dev)
    images = load_eval_images([str(folder / "images_evaluation.zip")], ckpt.preprocess,
                              device=dev)
    print(f"evaluation: {images.num_classes} unseen characters, {eval_episodes} episodes per "
          "setting, 15 queries per class")
    rows = []
    for way, shot in ((5, 1), (5, 5), (20, 1)):
        res = evaluate_with_bar(model, images, ckpt.preprocess, way, shot, None, eval_episodes,
                                seed=0, device=dev, label=f"eval {way}w{shot}s")
        rows.append((f"{way}-way {shot}-shot", res))
    print()
    print("Omniglot evaluation alphabets (never seen in training):")
    for label, res in rows:
        print(f"  {label:14s} {res}")
    print(f"checkpoint: {result.best_path}")
    print(f"total {time.perf_counter() - t0:.0f} s. Evaluate again with: fewshot-studio eval "
          f"--checkpoint {result.best_path} --data {folder / 'images_evaluation.zip'} "
          "--way 5 --shot 1 --episodes 1000")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_headless_demo())
