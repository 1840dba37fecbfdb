"""The many-shot head (``LabelSettings.adapt``): prototypes vs the logistic-regression head vs
``auto`` on paired episodes of the dev sets, accuracy with a 95% CI, plus the relabel time.

Dev sets (never a test split): GTSRB (43 classes x 60), CIFAR-10 (10 x 100) and the
Caltech-101 *val* classes (``resources/splits/caltech101_val.txt``). Each image is embedded
once with the checkpoint (torch, ``model.embed``) and the features are kept in
``<user cache dir>/benchmarks/`` (``--refresh`` re-embeds). Each setting draws the same
episodes for every mode (paired): ``way`` classes, ``shot`` support and ``query`` query
images a class; the figure is the mean accuracy, the paired difference to prototypes and
their 95% CIs (``1.96 * std / sqrt(episodes)``).

Targets (issue 17): at 20-shot ``auto`` >= prototypes + 2 points; at 1-shot no loss. And a
relabel after one correction with 10,000 cached 1280-d embeddings and ``adapt="auto"`` (20
examples a class, the head chosen) <= 50 ms.

    python benchmarks/adapt_head.py [--checkpoint natural-protonet] [--episodes 300]
        [--datasets gtsrb cifar10 caltech-val] [--shots 1 5 20] [--no-relabel]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fewshot_studio.data.datasets import ClassFolderDataset  # noqa: E402
from fewshot_studio.data.images import load_and_preprocess  # noqa: E402
from fewshot_studio.engine.api import LabelSettings  # noqa: E402
from fewshot_studio.models import FewShotClassifier  # noqa: E402
from fewshot_studio.paths import user_cache_dir  # noqa: E402

# the shared data folder; FEWSHOT_DEV_DATA elsewhere (a GPU lease's copy, say)
DATA = Path(os.environ.get("FEWSHOT_DEV_DATA") or ROOT.parent / "shared" / "data")
DEV_SETS = {"gtsrb": "gtsrb/gtsrb_subset.zip", "cifar10": "cifar10/cifar10_subset.zip",
            "caltech-val": "caltech101/caltech101.zip"}


def load_model(checkpoint: str) -> tuple[FewShotClassifier, object, float]:
    """``(model in eval mode, its Preprocess, its calibration temperature)``."""
    from fewshot_studio.io.checkpoint import load_checkpoint
    from fewshot_studio.paths import resolve_checkpoint

    ck = load_checkpoint(resolve_checkpoint(checkpoint))
    return ck.build("cpu").float().eval(), ck.preprocess, ck.temperature


def dev_images(dataset: str, per_class: int = 60
               ) -> tuple[ClassFolderDataset, list[str], np.ndarray]:
    """``(dataset, member names, labels (n,))``: up to ``per_class`` images a class of a dev
    set, class by class (the rows of :func:`dev_features`)."""
    if dataset == "caltech-val":
        split = ROOT / "resources" / "splits" / "caltech101_val.txt"
        names = [c.strip() for c in split.read_text().splitlines() if c.strip()]
        ds = ClassFolderDataset(DATA / DEV_SETS[dataset], classes=names)
    elif dataset == "omniglot-background":
        ds = ClassFolderDataset(DATA / "omniglot" / "images_background.zip")
    else:
        ds = ClassFolderDataset(DATA / DEV_SETS[dataset])
    by_class: list[list[str]] = [[] for _ in ds.class_names]
    for m, c in ds.samples:
        if len(by_class[c]) < per_class:
            by_class[c].append(m)
    members = [m for ms in by_class for m in ms]
    labels = np.asarray([c for c, ms in enumerate(by_class) for _ in ms])
    return ds, members, labels


def dev_features(checkpoint: str, dataset: str, per_class: int = 60, refresh: bool = False
                 ) -> tuple[torch.Tensor, np.ndarray]:
    """``(features (n, d), labels (n,))`` of :func:`dev_images`, embedded once and cached in
    ``<user cache dir>/benchmarks/``."""
    cache = user_cache_dir() / "benchmarks" / f"{checkpoint}-{dataset}-{per_class}.npz"
    if cache.exists() and not refresh:
        z = np.load(cache)
        return torch.from_numpy(z["x"]), z["y"]
    model, pre, _ = load_model(checkpoint)
    ds, members, y = dev_images(dataset, per_class)
    xs = [load_and_preprocess(ds.read_bytes(m), pre) for m in members]  # type: ignore[arg-type]
    feats = []
    t = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(xs), 64):
            feats.append(model.embed(torch.from_numpy(np.stack(xs[i:i + 64]))).float())
    x = torch.cat(feats).reshape(len(xs), -1)
    print(f"# embedded {len(y)} {dataset} images with {checkpoint} in "
          f"{time.perf_counter() - t:.0f} s", flush=True)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, x=x.numpy(), y=y)
    return x, y


def draw_episodes(y: np.ndarray, way: int, shot: int, query: int, episodes: int,
                  seed: int = 0, extra_classes: int = 0
                  ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Fixed episodes: ``(support idx, support labels, query idx, query labels, unknown idx)``
    per episode; ``extra_classes`` further classes give ``query`` images each as unknowns."""
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(y == c) for c in range(int(y.max()) + 1)]
    usable = [c for c, idx in enumerate(by_class) if len(idx) >= shot + query]
    out = []
    for _ in range(episodes):
        cls = rng.choice(usable, way + extra_classes, replace=False)
        s_idx, s_lab, q_idx, q_lab = [], [], [], []
        for k, c in enumerate(cls[:way]):
            pick = rng.choice(by_class[c], shot + query, replace=False)
            s_idx += pick[:shot].tolist()
            s_lab += [k] * shot
            q_idx += pick[shot:].tolist()
            q_lab += [k] * query
        u_idx = [i for c in cls[way:] for i in rng.choice(by_class[c], query, replace=False)]
        out.append((np.asarray(s_idx), np.asarray(s_lab), np.asarray(q_idx), np.asarray(q_lab),
                    np.asarray(u_idx, dtype=np.int64)))
    return out


def ci95(values: np.ndarray) -> float:
    return float(1.96 * values.std() / np.sqrt(len(values)))


def episode_accuracies(x: torch.Tensor, y: np.ndarray, model: FewShotClassifier,
                       temperature: float, way: int, shot: int, query: int, episodes: int,
                       modes: tuple[str, ...], seed: int = 0
                       ) -> tuple[dict[str, np.ndarray], float, float]:
    """Per-episode accuracy of each ``adapt`` mode on the same episodes; the share of
    episodes where ``auto`` chose the head and the mean ms of an ``auto`` fit."""
    from fewshot_studio.engine.head import adapt_to_support

    acc: dict[str, list[float]] = {m: [] for m in modes}
    chose_head, auto_ms = 0, 0.0
    for s_idx, s_lab, q_idx, q_lab, _ in draw_episodes(y, way, shot, query, episodes,
                                                           seed):
        sx, sy, qx = x[s_idx], torch.from_numpy(s_lab), x[q_idx]
        for mode in modes:
            t = time.perf_counter()
            adapted = adapt_to_support(model, sx, sy, way, mode, temperature,
                                       held_out_needed=False)
            if mode == "auto":
                auto_ms += 1000 * (time.perf_counter() - t)
                chose_head += adapted.kind == "head"
            with torch.no_grad():
                pred = adapted.predictor(qx).argmax(-1).numpy()
            acc[mode].append(float((pred == q_lab).mean()))
    return ({m: np.asarray(v) for m, v in acc.items()}, chose_head / episodes,
            auto_ms / episodes)


def relabel_ms(settings: list[LabelSettings], n: int = 10_000, d: int = 1280, n_way: int = 5,
               shot: int = 20) -> list[float]:
    """Median CPU ms of ``correct()`` with ``n`` cached ``d``-dim features and ``shot``
    examples a class, under each of ``settings`` in turn on the same session (paired: the
    machine's load hits them alike); overlapping generated classes, so ``adapt="auto"``
    chooses the head. CPU time: the head is single-threaded, so it is what a correction takes
    on an idle core."""
    from label_speed import cached_placeholders  # type: ignore[import-not-found]

    from fewshot_studio.engine.session import LabelingSession

    with tempfile.TemporaryDirectory() as td:
        ckpt, paths, cache_path = cached_placeholders(Path(td), n, d, n_way, per_class=shot,
                                                      spread=3.0)
        support = {f"c{k}": paths[n + k::n_way] for k in range(n_way)}
        cpu: list[list[float]] = [[] for _ in settings]
        kinds = [""] * len(settings)
        with LabelingSession(ckpt, settings[0], cache_path=cache_path,
                             backend="torch") as s:
            s.set_support(support)
            list(s.run(paths[:n]))
            assert s.counters.embedded == 0 and len(s.predictions()) == n
            for j in range(9):
                for i, setting in enumerate(settings):
                    s.set_settings(setting)  # not timed
                    c = time.process_time()
                    s.correct([paths[j * len(settings) + i]], f"c{(j + 1) % n_way}")
                    cpu[i].append(1000 * (time.process_time() - c))
                    kinds[i] = s.head_kind
    for setting, times, kind in zip(settings, cpu, kinds, strict=True):
        print(f"relabel after one correction, {n:,} cached {d}-d embeddings, {n_way} classes "
              f"x {shot} examples, adapt={setting.adapt} ({kind}), unknown_rule="
              f"{setting.unknown_rule}{', transductive' if setting.transductive else ''}: "
              f"{statistics.median(times):.1f} ms CPU median "
              "(target <= 50 ms)", flush=True)
    return [statistics.median(t) for t in cpu]


def main() -> None:
    from fewshot_studio.engine import head

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="natural-protonet")
    ap.add_argument("--datasets", nargs="*", default=["gtsrb", "cifar10"])
    ap.add_argument("--shots", nargs="+", type=int, default=[1, 5, 20])
    ap.add_argument("--way", type=int, default=5)
    ap.add_argument("--query", type=int, default=15)
    ap.add_argument("--episodes", type=int, default=300)
    ap.add_argument("--l2", type=float, default=head.HEAD_L2, help="tuning: HEAD_L2")
    ap.add_argument("--steps", type=int, default=head.HEAD_STEPS, help="tuning: HEAD_STEPS")
    ap.add_argument("--seed", type=int, default=0, help="episode seed (tune on one, e.g. "
                    "100; report on 0, the model card's)")
    ap.add_argument("--refresh", action="store_true", help="re-embed the images")
    ap.add_argument("--no-relabel", action="store_true", help="skip the relabel timing")
    args = ap.parse_args()
    torch.set_num_threads(1)
    head.HEAD_L2, head.HEAD_STEPS = args.l2, args.steps
    model, _, temperature = load_model(args.checkpoint)
    print(f"# {args.checkpoint}, {args.way}-way, {args.query} queries a class, "
          f"{args.episodes} paired episodes (seed {args.seed}); head L2 {args.l2}, "
          f"{args.steps} steps")
    print("dataset      shot  prototypes      head            auto            "
          "auto - prototypes  auto chose head  auto fit ms")
    for dataset in args.datasets:
        x, y = dev_features(args.checkpoint, dataset, refresh=args.refresh)
        for shot in args.shots:
            acc, share, ms = episode_accuracies(x, y, model, temperature, args.way, shot,
                                                args.query, args.episodes,
                                                ("none", "head", "auto"), args.seed)
            diff = acc["auto"] - acc["none"]
            cells = "  ".join(f"{100 * acc[m].mean():5.2f} +- {100 * ci95(acc[m]):4.2f}"
                              for m in ("none", "head", "auto"))
            print(f"{dataset:12s} {shot:4d}  {cells}  {100 * diff.mean():+5.2f} +- "
                  f"{100 * ci95(diff):4.2f}      {100 * share:5.1f}%           {ms:6.1f}",
                  flush=True)
    if not args.no_relabel:
        relabel_ms([LabelSettings(adapt="none", unknown_rule="threshold"),  # as before
                    LabelSettings(adapt="auto", unknown_rule="threshold"),
                    LabelSettings(adapt="auto", unknown_rule="adaptive"),
                    LabelSettings(adapt="none", unknown_rule="threshold", transductive=True)])


if __name__ == "__main__":
    main()
