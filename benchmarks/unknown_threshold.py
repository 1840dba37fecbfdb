"""How the default ``unknown_threshold`` was chosen: precision / coverage of the top
probability on real few-shot episodes, printed as a table per threshold.

For each model and dataset, N-way K-shot episodes (15 queries per class) plus 15
*distractor* queries from classes outside the episode (what "unknown" is for). A threshold
``t`` accepts a query when its top probability >= t. Per threshold:

* coverage: accepted in-class queries / in-class queries,
* precision: correct accepted / all accepted (accepted distractors count as wrong),
* distractors rejected: rejected distractors / distractors,
* F1 of precision and coverage, averaged over the settings.

The default (0.55, in ``LabelSettings``) was chosen by the mean of two F1 averages over the
calibrated bundled checkpoints (natural-protonet, natural-relation, natural-maml,
omniglot-protonet; their calibration temperature applied, as the engine does), 5-way 1- and
5-shot, 300 episodes: in-domain only (each model on its own kind of data: photos on the
Caltech-101 *test* classes, characters on Omniglot) and all settings (cross-domain too).
Measured 2026-11-26 (`--checkpoint` each of the four), again after omniglot-protonet was
retrained on a GPU: in-domain mean F1 0.907 at 0.40, 0.926 at 0.55, best 0.938 at 0.80; all
settings 0.815 at 0.40, best 0.822 at 0.55, falling to 0.804 at 0.75. The mean of the two
is 0.874 at 0.55 and 0.875 at 0.60-0.65 (flat), so the default stayed 0.55. For
natural-protonet on Caltech 5w1s, 0.55 keeps 96.5% of in-class queries at 87.8% precision
and rejects half the distractors.
Without ``--checkpoint``: the ImageNet-pretrained EfficientNet-Lite0 with a nearest-centroid
head, cosine (scale 10) and squared Euclidean (scale 1); the Euclidean scale-1 head is not
calibrated (top probabilities ~1 whatever the answer), so no threshold helps it.

Data: Caltech-101 test classes (``resources/splits/caltech101_test.txt``, never used to
train the natural-* checkpoints) and 40 Omniglot images_evaluation characters.

    python benchmarks/unknown_threshold.py [--episodes 300] [--checkpoint X ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fewshot_studio.data.datasets import ClassFolderDataset  # noqa: E402
from fewshot_studio.data.images import load_and_preprocess  # noqa: E402
from fewshot_studio.data.preprocess import Preprocess  # noqa: E402
from fewshot_studio.models import FewShotClassifier  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
THRESHOLDS = np.round(np.arange(0.2, 0.96, 0.05), 2)


def dataset_members(name: str, per_class: int, n_classes: int) -> tuple[ClassFolderDataset,
                                                                       list[list[str]]]:
    if name == "caltech":  # the committed test classes: never seen by natural-* training
        split = ROOT / "resources" / "splits" / "caltech101_test.txt"
        test = [c.strip() for c in split.read_text().splitlines() if c.strip()]
        ds = ClassFolderDataset(DATA / "caltech101" / "caltech101.zip", classes=test)
    else:
        ds = ClassFolderDataset(DATA / "omniglot" / "images_evaluation.zip")
        rng = np.random.default_rng(0)
        pick = sorted(rng.choice(len(ds.class_names), n_classes, replace=False).tolist())
        ds = ClassFolderDataset(DATA / "omniglot" / "images_evaluation.zip",
                                classes=[ds.class_names[i] for i in pick])
    members: list[list[str]] = [[] for _ in ds.class_names]
    for m, c in ds.samples:
        if len(members[c]) < per_class:
            members[c].append(m)
    return ds, members


def embed_all(model: FewShotClassifier, pre: Preprocess, ds: ClassFolderDataset,
              members: list[list[str]]) -> tuple[torch.Tensor, np.ndarray]:
    xs, ys = [], []
    for c, ms in enumerate(members):
        for m in ms:
            xs.append(load_and_preprocess(ds.read_bytes(m), pre))
            ys.append(c)
    feats = []
    with torch.inference_mode():
        for i in range(0, len(xs), 32):
            feats.append(model.embed(torch.from_numpy(np.stack(xs[i:i + 32]))))
    return torch.cat(feats).float(), np.asarray(ys)


def episodes_stats(model: FewShotClassifier, feats: torch.Tensor, ys: np.ndarray, way: int,
                   shot: int, episodes: int, seed: int = 0,
                   temperature: float = 1.0) -> dict[str, np.ndarray]:
    """Per query: top probability (``softmax(logits / temperature)``, as the engine computes
    it), correct?, distractor? over ``episodes`` episodes."""
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(ys == c) for c in range(ys.max() + 1)]
    usable = [c for c, idx in enumerate(by_class) if len(idx) >= shot + 15]
    conf, correct, distractor = [], [], []
    for _ in range(episodes):
        cls = rng.choice(usable, way + 1, replace=False)
        s_idx, s_lab, q_idx, q_lab = [], [], [], []
        for k, c in enumerate(cls[:way]):
            pick = rng.choice(by_class[c], shot + 15, replace=False)
            s_idx += pick[:shot].tolist()
            s_lab += [k] * shot
            q_idx += pick[shot:].tolist()
            q_lab += [k] * 15
        d_idx = rng.choice(by_class[cls[way]], 15, replace=False).tolist()
        with torch.no_grad():
            predictor = model.fit(feats[s_idx], torch.tensor(s_lab), way)
            probs = torch.softmax(predictor(feats[q_idx + d_idx]).float() / temperature, -1)
        top_p, top_i = probs.max(-1)
        conf.append(top_p.numpy())
        correct.append(np.r_[top_i[:len(q_idx)].numpy() == np.asarray(q_lab),
                             np.zeros(15, bool)])
        distractor.append(np.r_[np.zeros(len(q_idx), bool), np.ones(15, bool)])
    return {"conf": np.concatenate(conf), "correct": np.concatenate(correct),
            "distractor": np.concatenate(distractor)}


def table(st: dict[str, np.ndarray]) -> list[tuple[float, float, float, float, float]]:
    rows = []
    conf, correct, dis = st["conf"], st["correct"], st["distractor"]
    inc = ~dis
    for t in THRESHOLDS:
        acc = conf >= t
        coverage = (acc & inc).sum() / inc.sum()
        precision = (acc & correct).sum() / max(1, acc.sum())
        rejected = (~acc & dis).sum() / dis.sum()
        f1 = 2 * precision * coverage / max(1e-9, precision + coverage)
        rows.append((float(t), float(coverage), float(precision), float(rejected), float(f1)))
    return rows


# name, model, preprocessing, calibration temperature, in-domain data ("caltech"|"omniglot")
Model = tuple[str, FewShotClassifier, Preprocess, float, str]


def models(checkpoints: list[str]) -> list[Model]:
    """The models to measure, each with the calibration temperature the engine would apply
    (a checkpoint's recorded ``calibrate`` result; 1 for the uncalibrated baselines)."""
    from fewshot_studio.models import create_backbone, create_method
    from fewshot_studio.models.backbones.efficientnet_lite0 import LITE0_MEAN, LITE0_STD

    out: list[Model] = []
    if checkpoints:
        from fewshot_studio.io.checkpoint import load_checkpoint
        from fewshot_studio.paths import resolve_checkpoint

        for c in checkpoints:
            ck = load_checkpoint(resolve_checkpoint(c))
            domain = "omniglot" if "omniglot" in json.dumps(ck.training) else "caltech"
            out.append((ck.name or c, ck.build("cpu").eval(), ck.preprocess,
                        ck.temperature, domain))
        return out
    bb = create_backbone("efficientnet_lite0", image_size=224, pretrained=True).eval()
    pre = Preprocess(224, 3, LITE0_MEAN, LITE0_STD, "center_crop")
    out.append(("Lite0-ImageNet + ProtoNet cosine s=10",
                create_method("protonet", bb, distance="cosine", scale=10.0, pool="avg").eval(),
                pre, 1.0, "caltech"))
    out.append(("Lite0-ImageNet + ProtoNet euclidean s=1",
                create_method("protonet", bb, distance="euclidean", scale=1.0,
                              pool="avg").eval(), pre, 1.0, "caltech"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--episodes", type=int, default=300)
    ap.add_argument("--checkpoint", action="append", default=[])
    ap.add_argument("--per-class", type=int, default=30)
    args = ap.parse_args()
    all_f1: dict[str, list[np.ndarray]] = {}
    in_domain_f1: dict[str, list[np.ndarray]] = {}
    for mname, model, pre, temperature, domain in models(args.checkpoint):
        print(f"# {mname}: calibration temperature {temperature:.3f}")
        feats_cache: dict[str, tuple[torch.Tensor, np.ndarray]] = {}
        for dname in ("caltech", "omniglot"):
            t = time.perf_counter()
            ds, members = dataset_members(dname, args.per_class, 40)
            feats_cache[dname] = embed_all(model, pre, ds, members)
            print(f"# {mname}: embedded {len(feats_cache[dname][1])} {dname} images in "
                  f"{time.perf_counter() - t:.0f} s")
            for way, shot in ((5, 1), (5, 5)):
                st = episodes_stats(model, *feats_cache[dname], way, shot, args.episodes,
                                    temperature=temperature)
                rows = table(st)
                acc = st["correct"][~st["distractor"]].mean()
                print(f"\n{mname} | {dname} {way}w{shot}s, {args.episodes} episodes, "
                      f"accuracy {100 * acc:.1f}%")
                print("threshold coverage precision distractors_rejected F1")
                for r in rows:
                    print(f"  {r[0]:.2f}     {r[1]:.3f}    {r[2]:.3f}     {r[3]:.3f}"
                          f"               {r[4]:.3f}")
                all_f1.setdefault(mname, []).append(np.array([r[4] for r in rows]))
                if dname == domain:
                    in_domain_f1.setdefault(mname, []).append(np.array([r[4] for r in rows]))
    print()
    for label, table_ in (("all settings", all_f1), ("in-domain only", in_domain_f1)):
        for mname, f1s in table_.items():
            mean = np.mean(f1s, axis=0)
            best = THRESHOLDS[int(np.argmax(mean))]
            print(f"{mname}, {label}: mean F1 is highest at threshold {best:.2f} "
                  f"(F1 {mean.max():.3f}); F1 at 0.4: {mean[list(THRESHOLDS).index(0.4)]:.3f}, "
                  f"at 0.5: {mean[list(THRESHOLDS).index(0.5)]:.3f}")


if __name__ == "__main__":
    main()
