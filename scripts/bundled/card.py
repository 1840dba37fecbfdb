"""The model card of ``scripts/train_checkpoints.py`` (``--steps card``): checkpoints/README.md
written from the checkpoints' own metadata and the command logs, one function per section."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bundled.budgets import BASELINE_VARIANTS, NATURAL_CPU, OMNIGLOT_TRAIN, PAPER_TRAIN
from bundled.card_notes import NOTES
from bundled.common import (
    BASELINE_DESCRIPTION,
    EVAL_EPISODES,
    OMNIGLOT_PROTOCOL_NAMES,
    REPO,
    WITHIN_ALPHABET_PROTOCOLS,
    WITHIN_ALPHABET_TARGETS,
    Ctx,
    Log,
    natural_eval_sets,
    train_entry,
)
from bundled.evaluation import TRANSDUCTIVE_SUFFIX, TTA_SUFFIX, eval_variants

from fewshot_studio.data.tta import TTA_VIEWS
from fewshot_studio.io.checkpoint import Checkpoint, load_checkpoint
from fewshot_studio.training.records import within_alphabet_label

Write = Callable[[str], None]

OMNIGLOT_TARGETS = {  # name -> {protocol: minimum accuracy}, issue 5
    "omniglot-protonet": {"5w1s": 0.985, "20w1s": 0.955},
    "omniglot-relation": {"5w1s": 0.980, "20w1s": 0.940},
    "omniglot-maml": {"5w1s": 0.980, "20w1s": 0.940},
}
# What the papers report on their protocol (Conv4 backbones; 5w1s, 5w5s, 20w1s, 20w5s), and
# which of those issue 5 sets as targets.
PAPER_REFERENCE: dict[str, tuple[str, tuple[float, ...], tuple[str, ...]]] = {
    "paper-protonet": ("Snell et al. 2017", (0.988, 0.997, 0.960, 0.989),
                       OMNIGLOT_PROTOCOL_NAMES),
    "paper-relation": ("Sung et al. 2018", (0.996, 0.998, 0.976, 0.991), ("5w1s", "20w1s")),
    "paper-maml": ("Finn et al. 2017", (0.987, 0.999, 0.958, 0.989), ("5w1s", "20w1s")),
}
PAPER_TARGETS = {name: {p: acc for p, acc in zip(OMNIGLOT_PROTOCOL_NAMES, accs, strict=True)
                        if p in targeted}
                 for name, (_, accs, targeted) in PAPER_REFERENCE.items()}
PAPER_EVAL_LABEL = "omniglot-vinyals-test [vinyals_test]"  # make_paper_step's eval label


def _acc(r: dict[str, Any] | None) -> str:
    """An accuracy cell: % +- CI, the episodes when not the usual."""
    if not r:
        return "not run"
    n = r.get("episodes")
    more = f" ({n} ep.)" if n and n != EVAL_EPISODES else ""
    return f"{100 * r['accuracy']:.2f} +- {100 * r['ci95']:.2f}{more}"


def _shots(shot: Any) -> str:
    """``1`` -> "1"; ``[1, 5]`` (episodes alternating) -> "1/5"."""
    return "/".join(map(str, shot)) if isinstance(shot, (list, tuple)) else str(shot)


def card_sources(ctx: Ctx) -> list[Path]:
    """The run folders the card reads: this budget's first, then the others found."""
    others = sorted(d for d in (REPO / "runs").glob("bundled-*")
                    if d.is_dir() and d.resolve() != ctx.runs)
    return [ctx.runs, *others]


def merged_log(sources: Sequence[Path], metas: dict[str, Checkpoint]
               ) -> tuple[Log, set[str]]:
    """One command log for the card: per name, the entries of the run folder that trained the
    installed checkpoint (its ``config.out``), else of the first folder that has the name.
    Also the folder names used."""
    logs = [(d, Log(d / "commands.json")) for d in sources]
    merged = Log(Path(os.devnull))
    merged.data = {}
    used: set[str] = set()
    names = {n for _, lg in logs for n in lg.data}
    for name in sorted(names):
        trained_in = None
        if name in metas:
            out = metas[name].training.get("config", {}).get("out")
            trained_in = Path(out).parent.name if out else None
        having = [(d, lg) for d, lg in logs if name in lg.data]
        d, lg = next(((d, lg) for d, lg in having if d.name == trained_in), having[0])
        merged.data[name] = lg.data[name]
        used.add(d.name)
    return merged, used


def within_alphabet_section(w: Callable[[str], None], metas: dict[str, Checkpoint]) -> None:
    """The card's section on Lake et al.'s within-alphabet protocol, from the results
    :func:`within_alphabet_eval` recorded (nothing when no checkpoint has one)."""
    label = within_alphabet_label("omniglot-evaluation")
    names = [f"{way}w{shot}s" for way, shot in WITHIN_ALPHABET_PROTOCOLS]
    rows = [(n, metas[n].evaluation) for n in OMNIGLOT_TRAIN if n in metas]
    if not any(f"{label} {p}" in ev for _, ev in rows for p in names):
        return
    w("## Omniglot, within one alphabet (Lake et al. 2015)")
    w("")
    w("Lake et al.'s harder one-shot test, built from images_evaluation (their own 20 runs "
      "are not in the data): every episode's 20 classes come from one alphabet (the first "
      "folder level; alphabets with fewer characters than the way are skipped) and its "
      "support and query images from different drawers (the file-name suffix `_NN`: one "
      "support drawer, 15 other query drawers, the same for every class of the episode). "
      "Forced choice, top-1, no test-time options (what `label` does by default); `unknown` "
      "is the share of these queries, all of them from the support's classes, whose "
      "calibrated top probability is below `label`'s default threshold. People: 4.5 % error, "
      "Bayesian Program Learning 3.3 %, a Siamese convnet 8.0 % (on Lake's 20 runs).")
    w("")
    w("| checkpoint | " + " | ".join(f"within-alphabet {p} | error | unknown" for p in names)
      + " | random-class " + " | random-class ".join(names) + " |")
    w("|---|" + "---|---|---|" * len(names) + "---|" * len(names))
    for name, ev in rows:
        cells = []
        for p in names:
            r = ev.get(f"{label} {p}")
            err = f"{100 * (1 - r['accuracy']):.2f} %" if r else ""
            unk = (f"{100 * r['unknown']:.2f} % at {r['unknown_threshold']:g}"
                   if r and r.get("unknown") is not None else "")
            cells += [_acc(r), err, unk]
        cells += [_acc(ev.get(f"omniglot-evaluation {p}")) for p in names]
        w(f"| {name} | " + " | ".join(cells) + " |")
    w("")
    accs = {n: ev[f"{label} {p}"]["accuracy"] for n, ev in rows for p in names[:1]
            if f"{label} {p}" in ev}
    if accs:
        each = all(a >= WITHIN_ALPHABET_TARGETS["each"] for a in accs.values())
        best = max(accs.values()) >= WITHIN_ALPHABET_TARGETS["best"]
        w(f"Targets of issue 16 ({names[0]}): every checkpoint <= "
          f"{100 * (1 - WITHIN_ALPHABET_TARGETS['each']):.1f} % error: "
          f"{'met' if each else 'not met'}; the best <= "
          f"{100 * (1 - WITHIN_ALPHABET_TARGETS['best']):.1f} % (better than people): "
          f"{'met' if best else 'not met'}.")
        w("")


@dataclass
class CardInputs:
    """What the card is made of: the installed checkpoints (metadata and files), the run
    folders read (this budget's first), their merged command log and the folders it used,
    the natural baseline and the photo results kept beside it (variants, paired
    differences)."""

    ctx: Ctx
    metas: dict[str, Checkpoint]
    files: dict[str, Path]
    sources: list[Path]
    log: Log
    used: set[str]
    base_path: Path = field(init=False)
    base: Checkpoint | None = field(init=False)
    extra: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        self.base_path = self.first("natural-baseline.safetensors")
        self.base = load_checkpoint(self.base_path) if self.base_path.exists() else None
        results = self.first("natural_results.json")
        self.extra = json.loads(results.read_text()) if results.exists() else {}

    @classmethod
    def gather(cls, ctx: Ctx) -> CardInputs:
        files = {p.stem: p for p in sorted(ctx.checkpoints.glob("*.safetensors"))}
        metas = {n: load_checkpoint(p) for n, p in files.items()}
        sources = card_sources(ctx)
        log, used = merged_log(sources, metas)
        return cls(ctx, metas, files, sources, log, used)

    def first(self, rel: str) -> Path:
        """``rel`` in the first source that has it (else in this budget's)."""
        return next((d / rel for d in self.sources if (d / rel).exists()),
                    self.ctx.runs / rel)

    def size(self, name: str) -> str:
        return f"{self.files[name].stat().st_size / 1e6:.2f} MB"


def header_section(w: Write, c: CardInputs) -> None:
    w("# Bundled checkpoints: model card")
    w("")
    w("Generated by `scripts/train_checkpoints.py --budget " + c.ctx.budget + " --steps card` "
      "from the checkpoints' own metadata and the command logs ("
      + ", ".join(f"`runs/{d.name}/commands.json`" for d in c.sources if d.name in c.used)
      + "). Every figure below was produced by the command shown beside it. Accuracies are "
      "% +- 95% CI (1.96 std / sqrt(episodes)); episodes are fixed by `--seed 0`.")
    w("")
    w("Reproduce everything (splits, trainings, evaluations, this card) with one command per "
      "budget: `.venv/bin/python scripts/train_checkpoints.py --budget cpu` (2 CPU cores: the "
      "photo models), `--budget gpu` (one short GPU lease: the Omniglot models; "
      "`scripts/device_lease.sh` is the whole lease) or `--budget full` (issue 5's full "
      "schedules, for a CUDA GPU; not run yet). "
      "Set `DATA=../shared/data` (the folder with omniglot/, caltech101/, gtsrb/, cifar10/) "
      "to read the commands below; the script finds it itself ($FEWSHOT_DATA overrides).")
    w("")


TEST_TIME_HOW = {
    TTA_SUFFIX: f"no training: every image's features averaged over {TTA_VIEWS} fixed views "
                "(small warps and stroke changes)",
    TRANSDUCTIVE_SUFFIX: "no training: prototypes refined by soft k-means over each episode's "
                         "queries (Ren et al. 2018)"}


def omniglot_row(w: Write, c: CardInputs, name: str) -> None:
    """A bundled Omniglot checkpoint's row, then one per test-time option it was measured
    with."""
    ck = c.metas.get(name)
    if ck is None:
        w(f"| {name} | not trained | | | | | | | | |")
        return
    ev = ck.evaluation
    cfg = ck.training.get("config", {})
    w(f"| {name} | {ck.model['method']} {json.dumps(ck.model['method_config'])} | "
      f"{ck.model['backbone']} {json.dumps(ck.model['backbone_config'])}, "
      f"{ck.preprocess.image_size} px {'gray' if ck.preprocess.channels == 1 else 'RGB'} | "
      + " | ".join(_acc(ev.get(f"omniglot-evaluation {p}")) for p in OMNIGLOT_PROTOCOL_NAMES)
      + f" | {ck.training.get('step')} x {cfg.get('way')}w{cfg.get('shot')}s"
      f"{cfg.get('query')}q (meta-batch {cfg.get('meta_batch')}); validation "
      f"{cfg.get('val_way')}w{cfg.get('val_shot')}s | "
      f"{ck.training.get('wall_time_s')} s, "
      f"{(train_entry(c.log, name) or {}).get('hardware', ck.training.get('hardware'))} | "
      f"{c.size(name)} |")
    for suffix, key, _ in eval_variants("omniglot-evaluation")[1:]:
        if any(k.startswith(key + " ") for k in ev):
            w(f"| {name}{suffix} (the app's option) | same model | | "
              + " | ".join(_acc(ev.get(f"{key} {p}")) for p in OMNIGLOT_PROTOCOL_NAMES)
              + f" | {TEST_TIME_HOW[suffix]} | | |")


def omniglot_section(w: Write, c: CardInputs) -> None:
    w("## Omniglot (trained on images_background only, evaluated on images_evaluation)")
    w("")
    w("| checkpoint | method | backbone / input | 5w1s | 5w5s | 20w1s | 20w5s | "
      "episodes trained | wall time, hardware | size |")
    w("|---|---|---|---|---|---|---|---|---|---|")
    for name in OMNIGLOT_TRAIN:
        omniglot_row(w, c, name)
    w("")
    w("Evaluation: 1000 episodes per protocol, 15 queries per class (20 - K for K > 5), "
      "on all 659 images_evaluation characters (no rotations); never used for training or "
      "model selection (except where a cell says fewer episodes). Validation (model "
      "selection): 10% of the background characters, held out (seeded), unrotated, "
      "protocol as in the episodes column.")
    w("")


def paper_section(w: Write, c: CardInputs) -> None:
    w("## Omniglot, the papers' protocol (Vinyals trainval -> test; not shipped)")
    w("")
    w("| run | 5w1s | 5w5s | 20w1s | 20w5s | episodes trained | wall time, hardware | "
      "paper (5w1s / 5w5s / 20w1s / 20w5s) |")
    w("|---|---|---|---|---|---|---|---|")
    for name, (cite, accs, _) in PAPER_REFERENCE.items():
        paper = " / ".join(f"{100 * a:.1f}" for a in accs) + f" ({cite})"
        best = c.first(f"{name}/best.safetensors")
        if not best.exists():
            w(f"| {name} | not run | | | | | | {paper} |")
            continue
        ck = load_checkpoint(best)
        cfg = ck.training.get("config", {})
        for how, key, _ in eval_variants(PAPER_EVAL_LABEL):
            if not any(k.startswith(key + " ") for k in ck.evaluation):
                continue
            trained = (f"{ck.training.get('step')} x {cfg.get('way')}w{cfg.get('shot')}s"
                       f"{cfg.get('query')}q" if not how else "same model")
            hw = f"{ck.training.get('wall_time_s')} s, {ck.training.get('hardware')}" \
                if not how else ""
            w(f"| {name}{how} | " + " | ".join(_acc(ck.evaluation.get(f"{key} {p}"))
                                              for p in OMNIGLOT_PROTOCOL_NAMES)
              + f" | {trained} | {hw} | {paper if not how else ''} |")
    w("")


def photo_columns() -> list[tuple[str, str]]:
    return [(lab, p) for lab in natural_eval_sets() for p in ("5w1s", "5w5s")]


def photo_results_section(w: Write, c: CardInputs) -> None:
    w("## Photos (EfficientNet-Lite0, 224 px RGB, mean = std = 0.5, centre crop)")
    w("")
    w("Class split: `resources/splits/caltech101_{train,val,test}.txt` (60/20/21 classes, "
      "BACKGROUND_Google excluded, seeded). Cross-domain: GTSRB subset (43 classes x 60) and "
      "CIFAR-10 subset (10 x 100), all classes.")
    w("")
    cols = photo_columns()
    w("| model | " + " | ".join(f"{lab} {p}" for lab, p in cols) + " | size |")
    w("|---|" + "---|" * len(cols) + "---|")
    rows: list[tuple[str, dict[str, Any], str]] = []
    if c.base is not None:
        rows.append(("baseline: pretrained Lite0, cosine nearest-centroid, not meta-trained",
                     c.base.evaluation, f"{c.base_path.stat().st_size / 1e6:.2f} MB"))
    for variant, (label, _) in BASELINE_VARIANTS.items():
        if variant in c.extra:
            rows.append((label, c.extra[variant], "-"))
    for name in NATURAL_CPU:
        ck = c.metas.get(name)
        if ck is not None:
            rows.append((f"**{name}** ({ck.description})", ck.evaluation, c.size(name)))
    for label, ev, size in rows:
        w(f"| {label} | " + " | ".join(_acc(ev.get(f"{lab} {p}")) for lab, p in cols)
          + f" | {size} |")
    w("")


def photo_training_section(w: Write, c: CardInputs) -> None:
    w("| checkpoint | method (config) | trained | steps (best at) | wall time | hardware |")
    w("|---|---|---|---|---|---|")
    for name in NATURAL_CPU:
        ck = c.metas.get(name)
        if ck is None:
            continue
        t = ck.training
        e = train_entry(c.log, name) or {}
        if not t.get("meta_trained", True):
            w(f"| {name} | {ck.model['method']} {json.dumps(ck.model['method_config'])} | "
              "no: ImageNet weights only (the baseline) | - | - | - |")
            continue
        cfg = t.get("config", {})
        trained = (t.get("procedure") or "fewshot-studio train (end to end)") + \
            f"; {cfg.get('way')}-way {_shots(cfg.get('shot'))}-shot {cfg.get('query')}-query; " \
            "Caltech-101 train classes (val: val classes)"
        w(f"| {name} | {ck.model['method']} {json.dumps(ck.model['method_config'])} | "
          f"{trained} | {t.get('steps_run', t.get('step'))} ({t.get('best_step', '-')}) | "
          f"{t.get('wall_time_s')} s | {e.get('hardware', t.get('hardware'))} |")
    w("")
    if c.extra.get("paired"):
        w("Paired differences on the same 1000 Caltech test episodes (model minus baseline, "
          "points, +- 95% CI of the per-episode differences; `scripts/train_checkpoints.py "
          "--budget cpu --steps paired`):")
        w("")
        for name, d in c.extra["paired"].items():
            w(f"- {name}: " + "; ".join(f"{k}: {100 * v['diff']:+.2f} +- {100 * v['ci95']:.2f}"
                                         for k, v in d.items()))
        w("")


def omniglot_targets(w: Write, c: CardInputs) -> None:
    """Issue 5's Omniglot targets: the bundled checkpoints', then the papers' protocol's."""
    for name, targets in OMNIGLOT_TARGETS.items():
        ck = c.metas.get(name)
        ev = ck.evaluation if ck else {}
        for p, t in targets.items():
            for how, label, _ in eval_variants("omniglot-evaluation"):
                r = ev.get(f"{label} {p}")
                if how and not r:
                    continue
                met = "yes" if r and r["accuracy"] >= t else "no"
                w(f"| {name}{how} | {p} >= {100 * t:.1f} | {_acc(r)} | {met} |")
    for name, targets in PAPER_TARGETS.items():
        best = c.first(f"{name}/best.safetensors")
        ev = load_checkpoint(best).evaluation if best.exists() else {}
        for p, t in targets.items():
            for how, key_label, _ in eval_variants(PAPER_EVAL_LABEL):
                r = ev.get(f"{key_label} {p}")
                if how and not r:
                    continue
                met = ("yes" if r["accuracy"] >= t else "no") if r else "not run"
                w(f"| {name}{how} (Vinyals trainval -> test, not shipped) | "
                  f"{p} >= {100 * t:.1f} | {_acc(r)} | {met} |")


def photo_target(c: CardInputs, name: str, ck: Checkpoint, lab: str, p: str,
                 r: dict[str, Any], b: dict[str, Any]) -> tuple[str, bool]:
    """``(condition, met)`` of a photo model against the baseline on one set and protocol:
    Caltech: better (by the paired difference's CI where measured); cross-domain: within a
    point."""
    if not lab.startswith("caltech"):
        return (f"{lab} {p} >= baseline - 1 ({100 * b['accuracy'] - 1:.2f})",
                r["accuracy"] >= b["accuracy"] - 0.01)
    is_base = ck.description == BASELINE_DESCRIPTION
    cond, ok = (f"{lab} {p} > baseline {100 * b['accuracy']:.2f}",
                r["accuracy"] > b["accuracy"] and not is_base)
    if is_base:
        cond += " (this file *is* the baseline)"
    pd = c.extra.get("paired", {}).get(name, {}).get(f"{lab} {p}")
    if pd and not is_base:  # beat = paired difference's CI above zero
        ok = pd["diff"] - pd["ci95"] > 0
        cond += f"; paired diff {100 * pd['diff']:+.2f} +- {100 * pd['ci95']:.2f}"
        if not ok and r["accuracy"] > b["accuracy"]:
            cond += " (within noise)"
    return cond, ok


def photo_targets(w: Write, c: CardInputs) -> None:
    if c.base is None:
        return
    bev = c.base.evaluation
    for name in NATURAL_CPU:
        ck = c.metas.get(name)
        if ck is None:
            continue
        for lab, p in photo_columns():
            r, b = ck.evaluation.get(f"{lab} {p}"), bev.get(f"{lab} {p}")
            if not r or not b:
                continue
            cond, ok = photo_target(c, name, ck, lab, p, r, b)
            w(f"| {name} | {cond} | {_acc(r)} | {'yes' if ok else 'no'} |")


def targets_section(w: Write, c: CardInputs) -> None:
    w("## Targets of issue 5")
    w("")
    w("| checkpoint | target | measured | met |")
    w("|---|---|---|---|")
    omniglot_targets(w, c)
    photo_targets(w, c)
    w("")


def notes_section(w: Write, c: CardInputs) -> None:
    w("## How these were made, and what they are not")
    w("")
    for budget in ("gpu", "cpu", "full"):
        if f"bundled-{budget}" in c.used:
            w(NOTES[budget])
    w("")


def commands_section(w: Write, c: CardInputs) -> None:
    w("## Commands")
    w("")
    for name in [*OMNIGLOT_TRAIN, *NATURAL_CPU, "natural-baseline", "features", "crosscheck",
                 *PAPER_TRAIN]:
        entries = c.log.data.get(name, [])
        if not entries:
            continue
        w(f"### {name}")
        w("")
        for e in entries:
            w(f"- {e.get('kind')} ({e.get('wall_s')} s on {e.get('hardware')}):")
            w("")
            w(f"  `{e['cmd']}`")
            if e.get("result"):
                w(f"  -> {e['result']} ({e.get('compare', '')})")
            w("")


def card_text(c: CardInputs) -> str:
    lines: list[str] = []
    w = lines.append
    header_section(w, c)
    omniglot_section(w, c)
    within_alphabet_section(w, c.metas)
    paper_section(w, c)
    photo_results_section(w, c)
    photo_training_section(w, c)
    targets_section(w, c)
    notes_section(w, c)
    commands_section(w, c)
    return "\n".join(lines) + "\n"


def step_card(ctx: Ctx) -> None:
    """checkpoints/README.md from the checkpoints' metadata and the command log."""
    path = ctx.checkpoints / "README.md"
    path.write_text(card_text(CardInputs.gather(ctx)))
    print(f"[card] wrote {path}")
