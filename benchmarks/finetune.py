"""Test-time fine-tuning (``--adapt finetune``, :mod:`fewshot_studio.models.finetune`) vs
prototypes (``--adapt none``) on paired episodes of the dev sets: accuracy, the paired
difference with its 95% CI (``1.96 * std / sqrt(episodes)``) and the fine-tuning seconds per
episode.

Dev sets only (never a test split): GTSRB, CIFAR-10 and the Caltech-101 *val* classes. Each
episode draws ``way`` classes, ``shot`` support and ``query`` query images a class (the same
episodes for every setting: paired). Choose settings with one seed (``--seed``) and report
them with another: the chosen settings are never scored on the episodes that chose them.

Every setting with the same ``blocks``, ``views`` and ``strength`` shares one bank of
augmented views per episode (what :func:`~fewshot_studio.models.finetune.finetune` computes
first), and the queries go through the frozen prefix once; both are exactly what
``finetune`` does, only not repeated per setting. Seconds per episode: the bank plus the
steps, wall time (the machine's other load counts) and this process's CPU time.

Settings are ``BLOCKS:LR:STEPS[:QUERY[:STRENGTH]]`` (:class:`~fewshot_studio.models.finetune.
FinetuneSettings`; the omitted ones its defaults); without ``--settings``:
``FinetuneSettings()``; ``--settings`` with none: no fine-tuning. The modes
on cached features (none, head, transductive; ``adapt_head.dev_features``) run on the same
episodes. The model card's table:

    nice -n 10 python benchmarks/finetune.py --datasets gtsrb cifar10 --seed 0 \\
        --episodes 30 --shots 1 5 --threads 1

The GPU budget (<= 2 s for 5-way 5-shot): ``--device cuda`` fine-tunes there
(``scripts/device_lease.sh`` runs it).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from adapt_head import (  # type: ignore[import-not-found]  # noqa: E402
    ci95,
    dev_features,
    dev_images,
    draw_episodes,
)

from fewshot_studio.data.images import load_and_preprocess  # noqa: E402
from fewshot_studio.data.preprocess import Preprocess  # noqa: E402
from fewshot_studio.models import FewShotClassifier  # noqa: E402
from fewshot_studio.models.finetune import (  # noqa: E402
    FinetuneSettings,
    augment_for,
    embed_from_prefix,
    finetune_on_bank,
    prefix_maps,
    view_bank,
)


def cheap_modes(model: FewShotClassifier, temperature: float, feats: torch.Tensor,
                s_idx: np.ndarray, s_lab: np.ndarray, q_idx: np.ndarray, q_lab: np.ndarray,
                way: int) -> dict[str, tuple[float, float]]:
    """Accuracy and seconds of ``none`` (prototypes), ``head`` (the many-shot head) and
    ``transductive`` (prototypes refined over the queries) on cached features."""
    from fewshot_studio.engine.head import TRANSDUCTIVE_ITERS, adapt_to_support

    sx, sy, qx = feats[s_idx], torch.from_numpy(s_lab), feats[q_idx]
    out = {}
    for mode in ("none", "head", "transductive"):
        t = time.perf_counter()
        with torch.enable_grad():
            adapted = adapt_to_support(model, sx, sy, way, "none" if mode == "transductive"
                                       else mode, temperature, held_out_needed=False)
        with torch.no_grad():
            pred = adapted.predictor
            if mode == "transductive":
                pred = pred.refine(qx, n_iters=TRANSDUCTIVE_ITERS)  # type: ignore[attr-defined]
            guess = pred(qx).argmax(-1).numpy()
        out[mode] = (float((guess == q_lab).mean()), time.perf_counter() - t)
    return out


def parse_setting(text: str, views: int, seed: int) -> FinetuneSettings:
    """``"blocks:lr:steps[:query[:strength]]"`` -> :class:`FinetuneSettings`."""
    blocks, lr, steps, *rest = text.split(":")
    d = FinetuneSettings()
    return FinetuneSettings(steps=int(steps), lr=float(lr), blocks=int(blocks), views=views,
                            query=int(rest[0]) if rest else d.query,
                            strength=float(rest[1]) if len(rest) > 1 else d.strength,
                            seed=seed)


def accuracy(model: FewShotClassifier, s_feat: torch.Tensor, s_lab: np.ndarray,
             q_feat: torch.Tensor, q_lab: np.ndarray, way: int) -> float:
    with torch.no_grad():
        logits = model.fit(s_feat, torch.from_numpy(s_lab).to(s_feat.device), way)(q_feat)
    return float((logits.argmax(-1).cpu().numpy() == q_lab).mean())


def run_episode(model: FewShotClassifier, x_s: torch.Tensor, s_lab: np.ndarray,
                x_q: torch.Tensor, q_lab: np.ndarray, way: int,
                settings: list[FinetuneSettings], pre: Preprocess
                ) -> tuple[list[float], list[float], list[float]]:
    """Accuracy, wall seconds and CPU seconds of fine-tuning with each of ``settings``
    (settings with the same ``blocks``, ``views`` and ``strength`` share the bank of
    augmented views; each is charged all of its cost)."""
    accs, secs, cpus = [0.0] * len(settings), [0.0] * len(settings), [0.0] * len(settings)
    groups: dict[tuple[int, int, float], list[int]] = {}
    for i, st in enumerate(settings):
        groups.setdefault((st.blocks, st.views, st.strength), []).append(i)
    y = torch.from_numpy(s_lab)
    sync = torch.cuda.synchronize if x_s.is_cuda else (lambda: None)  # GPU time, not queueing
    for (blocks, _, strength), members in groups.items():
        q_maps = prefix_maps(model, x_q, blocks)
        sync()
        t, c = time.perf_counter(), time.process_time()
        bank = None
        for p in view_bank(model, x_s, augment_for(pre, strength), settings[members[0]]):
            bank = p.payload if p.payload is not None else bank
        sync()
        bank_s, bank_c = time.perf_counter() - t, time.process_time() - c
        assert bank is not None
        for i in members:
            t, c = time.perf_counter(), time.process_time()
            adapted = None
            for p in finetune_on_bank(model, bank, y, settings[i], way):
                adapted = p.payload if p.payload is not None else adapted
            sync()
            secs[i] = bank_s + time.perf_counter() - t
            cpus[i] = bank_c + time.process_time() - c
            with torch.no_grad():
                accs[i] = accuracy(adapted, embed_from_prefix(adapted, bank[0], blocks), s_lab,
                                   embed_from_prefix(adapted, q_maps, blocks), q_lab, way)
    return accs, secs, cpus


def report(dataset: str, shot: int, rows: dict[str, tuple[list, list, list]]) -> None:
    """One line per mode: accuracy +- CI, paired difference to ``none`` +- CI, s/episode."""
    base = np.asarray(rows["none"][0])
    for name, (acc, sec, cpu) in rows.items():
        a = np.asarray(acc)
        diff = "" if name == "none" else (f"  diff {100 * (a - base).mean():+5.2f} +- "
                                          f"{100 * ci95(a - base):4.2f}")
        print(f"{dataset:12s} {shot}-shot {name:22s} {100 * a.mean():5.2f} +- "
              f"{100 * ci95(a):4.2f}{diff:26s}  {np.mean(sec):7.3f} s/episode "
              f"({np.mean(cpu):7.3f} s CPU)", flush=True)


def main() -> None:
    from fewshot_studio.io.checkpoint import load_checkpoint
    from fewshot_studio.paths import resolve_checkpoint

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="natural-protonet")
    ap.add_argument("--datasets", nargs="+", default=["gtsrb", "cifar10"])
    ap.add_argument("--settings", nargs="*", default=None,
                    metavar="BLOCKS:LR:STEPS[:QUERY[:STRENGTH]]",
                    help="fine-tuning settings to compare (default: FinetuneSettings(); "
                         "none given: only the modes on cached features)")
    ap.add_argument("--views", type=int, default=FinetuneSettings().views)
    ap.add_argument("--way", type=int, default=5)
    ap.add_argument("--shots", type=int, nargs="+", default=[5])
    ap.add_argument("--query", type=int, default=10)
    ap.add_argument("--episodes", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0, help="episode seed (choose on one, "
                    "report on another)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--device", default="cpu",
                    help="where fine-tuning runs: cpu or cuda (the <= 2 s GPU budget)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ck = load_checkpoint(resolve_checkpoint(args.checkpoint))
    model = ck.build("cpu").float().eval()  # the modes on cached features
    tuned = model if args.device == "cpu" else ck.build(args.device).float().eval()
    d = FinetuneSettings()
    texts = ([f"{d.blocks}:{d.lr:g}:{d.steps}:{d.query}:{d.strength:g}"]
             if args.settings is None
             else args.settings)
    settings = [parse_setting(s, args.views, args.seed) for s in texts]
    print(f"# {args.checkpoint}, {args.way}-way, {args.query} queries a class, "
          f"{args.episodes} paired episodes (seed {args.seed}), fine-tuning with {args.views} "
          f"views, {torch.get_num_threads()} threads, fine-tuning on {args.device}",
          flush=True)
    for dataset in args.datasets:
        feats, y = dev_features(args.checkpoint, dataset)
        ds, members, labels = dev_images(dataset)
        assert np.array_equal(labels, y), "images and cached features do not pair"
        for shot in args.shots:
            rows: dict[str, tuple[list, list, list]] = {
                m: ([], [], []) for m in ("none", "head", "transductive",
                                          *(f"finetune {t}" for t in texts))}
            for e, (s_idx, s_lab, q_idx, q_lab, _) in enumerate(draw_episodes(
                    y, args.way, shot, args.query, args.episodes, seed=args.seed)):
                for m, (a, sec) in cheap_modes(model, ck.temperature, feats, s_idx, s_lab,
                                               q_idx, q_lab, args.way).items():
                    rows[m][0].append(a)
                    rows[m][1].append(sec)
                    rows[m][2].append(sec)
                if not settings:
                    continue
                x_s, x_q = (torch.from_numpy(np.stack([
                    load_and_preprocess(ds.read_bytes(members[i]), ck.preprocess)
                    for i in idx])).to(args.device) for idx in (s_idx, q_idx))
                accs, secs, cpus = run_episode(tuned, x_s, s_lab, x_q, q_lab, args.way,
                                               settings, ck.preprocess)
                for t, a, sec, cpu in zip(texts, accs, secs, cpus, strict=True):
                    for col, v in zip(rows[f"finetune {t}"], (a, sec, cpu), strict=True):
                        col.append(v)
                print(f"# {dataset} {shot}-shot episode {e + 1}: none "
                      f"{rows['none'][0][-1]:.2f} finetune "
                      + " ".join(f"{a:.2f}" for a in accs), file=sys.stderr, flush=True)
            report(dataset, shot, {k: v for k, v in rows.items() if v[0]})


if __name__ == "__main__":
    main()
