"""Open-set labeling on the dev sets: known classes with K examples each, held-back classes
mixed into the queries; how many images get a label, how many of those are right, how many
of the others come out unknown, for the adaptive unknown rule (``unknown_rule="adaptive"``,
each ``miss_rate``) and the fixed probability threshold (``unknown_rule="threshold"``).

Per episode: ``way`` known classes x ``shot`` examples, ``query`` query images of each known
class and of each of ``unknown`` held-back classes (the same episodes for every rule). The
support is fitted as the engine does (:func:`fewshot_studio.engine.head.adapt_to_support`,
``adapt`` as given, default "auto"); pooled over the episodes:

* A: forced-choice accuracy on the in-support queries (every query labeled);
* labeled: the share of in-support queries given a label (not unknown);
* precision: the share of the labels given that are right (a labeled held-back image is
  wrong);
* rejected: the share of held-back images marked unknown.

Targets (issue 17, default settings, 5 x 5, 1-2 unknown classes): precision >= 0.90; labeled
>= 0.75 * min(1, A / 0.9); rejected >= 0.70.

    python benchmarks/open_set.py [--checkpoint natural-protonet] [--episodes 300]
        [--datasets gtsrb cifar10 caltech-val] [--unknown 1 2] [--shot 5] [--adapt auto]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from adapt_head import dev_features, draw_episodes, load_model  # noqa: E402

from fewshot_studio.engine.api import LabelSettings  # noqa: E402
from fewshot_studio.engine.head import Adapted, adapt_to_support, is_unknown  # noqa: E402

MISS_RATES = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3)
THRESHOLDS = (0.3, 0.4, 0.55, 0.7, 0.8, 0.9)


def collect(x: torch.Tensor, y: np.ndarray, model: object, temperature: float, way: int,
            shot: int, query: int, unknown: int, episodes: int, adapt: str, seed: int
            ) -> tuple[dict[str, np.ndarray], list[Adapted]]:
    """Per query (pooled over episodes): top probability, typicality p-value, right?,
    held-back?, episode number; and each episode's :class:`Adapted`."""
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("p", "typical", "right", "out", "ep")}
    fits = []
    for e, (s_idx, s_lab, q_idx, q_lab, u_idx) in enumerate(
            draw_episodes(y, way, shot, query, episodes, seed, extra_classes=unknown)):
        with torch.enable_grad():
            adapted = adapt_to_support(model, x[s_idx], torch.from_numpy(s_lab), way, adapt,
                                       temperature)
        fits.append(adapted)
        q = x[np.r_[q_idx, u_idx]]
        with torch.no_grad():
            logits = adapted.predictor(q).float() / temperature
            top = (adapted.prototypes(q).float().max(-1).values / temperature
                   if adapted.kind == "head" else logits.max(-1).values)
            typical = adapted.typicality(top) if adapted.has_heldout else torch.ones(len(q))
        top_p, top_i = torch.softmax(logits, -1).max(-1)
        n_in = len(q_idx)
        cols["p"].append(top_p.numpy())
        cols["typical"].append(typical.numpy())
        cols["right"].append(np.r_[top_i[:n_in].numpy() == q_lab, np.zeros(len(u_idx), bool)])
        cols["out"].append(np.r_[np.zeros(n_in, bool), np.ones(len(u_idx), bool)])
        cols["ep"].append(np.full(n_in + len(u_idx), e))
    return {k: np.concatenate(v) for k, v in cols.items()}, fits


def rates(st: dict[str, np.ndarray], unknown_mask: np.ndarray) -> tuple[float, float, float]:
    """``(labeled share of in-support, precision of labels given, rejected held-back)``."""
    given = ~unknown_mask
    inside = ~st["out"]
    labeled = float((given & inside).sum() / max(1, inside.sum()))
    precision = float((given & st["right"]).sum() / max(1, given.sum()))
    rejected = float((unknown_mask & st["out"]).sum() / max(1, st["out"].sum()))
    return labeled, precision, rejected


def adaptive_mask(st: dict[str, np.ndarray], fits: list[Adapted], miss_rate: float,
                  fallback: float) -> np.ndarray:
    """The engine's adaptive decision per query, with each episode's own thresholds."""
    out = np.zeros(len(st["p"]), bool)
    for e, adapted in enumerate(fits):
        sel = st["ep"] == e
        if adapted.has_heldout:
            out[sel] = is_unknown(st["p"][sel], st["typical"][sel], adapted.min_prob(),
                                  miss_rate)
        else:
            out[sel] = is_unknown(st["p"][sel], st["typical"][sel], fallback, 0.0)
    return out


def main() -> None:
    default = LabelSettings()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="natural-protonet")
    ap.add_argument("--datasets", nargs="+", default=["gtsrb", "cifar10", "caltech-val"])
    ap.add_argument("--way", type=int, default=5)
    ap.add_argument("--shot", type=int, default=5)
    ap.add_argument("--query", type=int, default=15)
    ap.add_argument("--unknown", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--episodes", type=int, default=300)
    ap.add_argument("--adapt", default=default.adapt)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, _, temperature = load_model(args.checkpoint)
    print(f"# {args.checkpoint} (temperature {temperature:.3f}), {args.way} known classes x "
          f"{args.shot} examples, {args.query} queries a class, adapt={args.adapt}, "
          f"{args.episodes} episodes; default miss_rate {default.miss_rate}")
    for dataset in args.datasets:
        x, y = dev_features(args.checkpoint, dataset)
        for n_unknown in args.unknown:
            st, fits = collect(x, y, model, temperature, args.way, args.shot, args.query,
                               n_unknown, args.episodes, args.adapt, args.seed)
            acc = float(st["right"][~st["out"]].mean())
            need = 0.75 * min(1.0, acc / 0.9)
            print(f"\n{dataset}, {n_unknown} held-back class(es): forced-choice A = "
                  f"{100 * acc:.1f}%; targets: precision >= 90%, labeled >= "
                  f"{100 * need:.1f}%, rejected >= 70%")
            print("rule                     labeled  precision  rejected  targets met")
            rows = [(f"adaptive miss_rate {m:<5g}", adaptive_mask(st, fits, m,
                                                                  default.unknown_threshold))
                    for m in MISS_RATES]
            rows += [(f"threshold {t:<14g}", st["p"] < t) for t in THRESHOLDS]
            for name, mask in rows:
                lab, prec, rej = rates(st, mask)
                met = (prec >= 0.9) + (lab >= need) + (rej >= 0.7)
                star = " (default)" if name.startswith(
                    f"adaptive miss_rate {default.miss_rate:<5g}") else ""
                print(f"{name}  {100 * lab:6.1f}%   {100 * prec:6.1f}%   {100 * rej:6.1f}%   "
                      f"{met}/3{star}", flush=True)


if __name__ == "__main__":
    main()
