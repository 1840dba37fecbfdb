"""The evaluations of ``scripts/train_checkpoints.py``: the Omniglot protocols through
``fewshot-studio eval`` (plain, test-time augmentation, transductive, within one alphabet),
the photo sets (``eval``, or on the cpu budget the same sampler and seed on cached trunk
features) and the paired differences against the baseline."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bundled.budgets import BASELINE_VARIANTS, NATURAL_CPU, OMNIGLOT_TRAIN, PAPER_TRAIN
from bundled.common import (
    BASELINE_DESCRIPTION,
    EVAL_EPISODES,
    EXE,
    NATURAL_PROTOCOLS,
    OMNIGLOT_PROTOCOLS,
    WITHIN_ALPHABET_PROTOCOLS,
    Ctx,
    hardware,
    natural_eval_sets,
    omniglot,
    sh,
)
from bundled.natural import feature_cache, head_model

from fewshot_studio.data.tta import TTA_VIEWS
from fewshot_studio.engine.head import TRANSDUCTIVE_ITERS
from fewshot_studio.io.checkpoint import Checkpoint, load_checkpoint
from fewshot_studio.training.cached import evaluate_features
from fewshot_studio.training.evaluate import confidence_interval
from fewshot_studio.training.records import (
    record_result,
    result_key,
    transductive_label,
    tta_label,
    within_alphabet_label,
)


def transductive_key(label: str) -> str:
    """The evaluation label ``fewshot-studio eval --transductive`` records results under."""
    return transductive_label(label, TRANSDUCTIVE_ITERS)


def tta_key(label: str) -> str:
    """The evaluation label ``fewshot-studio eval --tta`` records results under."""
    return tta_label(label, TTA_VIEWS)


TTA_SUFFIX = f" + test-time augmentation x{TTA_VIEWS}"
TRANSDUCTIVE_SUFFIX = f" + transductive x{TRANSDUCTIVE_ITERS}"


def eval_variants(label: str) -> list[tuple[str, str, list[str]]]:
    """How the Omniglot checkpoints are evaluated: ``(the card's suffix, the label results are
    recorded under, eval arguments)``: plain, with the app's test-time augmentation, with its
    transductive refinement."""
    return [("", label, []), (TTA_SUFFIX, tta_key(label), ["--tta"]),
            (TRANSDUCTIVE_SUFFIX, transductive_key(label), ["--transductive"])]


def omniglot_eval(ctx: Ctx, name: str, ckpt: Path, classes: str | None = None,
                  label: str = "omniglot-evaluation",
                  data: Sequence[str] | None = None, plain: bool = True) -> None:
    """Every Omniglot protocol in each of :func:`eval_variants` (plain unless ``plain`` is
    False; transductive for methods that can refine their predictor)."""
    data = list(data or [omniglot("evaluation")])
    loaded = load_checkpoint(ckpt)
    refines = loaded.build("cpu").supports_refinement
    recorded = label + (f" [{Path(classes).stem}]" if classes else "")
    for _, key_label, extra in eval_variants(recorded):
        if (not extra and not plain) or ("--transductive" in extra and not refines):
            continue
        for way, shot in OMNIGLOT_PROTOCOLS:
            if result_key(key_label, way, shot) in loaded.evaluation and not ctx.reeval:
                continue  # measured already (a resumed pipeline)
            cmd = [*EXE, "eval", "--checkpoint", str(ckpt), "--data", *data,
                   "--way", str(way), "--shot", str(shot), "--episodes",
                   str(ctx.eval_episodes(name, way)), "--seed", "0", "--device", "auto",
                   "--write-results", "--label", label, *extra]
            if classes:
                cmd += ["--classes", classes]
            sh(ctx.log, name, cmd, kind="eval")


def within_alphabet_eval(ctx: Ctx, name: str, ckpt: Path,
                         label: str = "omniglot-evaluation") -> None:
    """Lake et al.'s within-alphabet protocol (:data:`WITHIN_ALPHABET_PROTOCOLS`) on
    images_evaluation, as `label` runs by default (no test-time options), with the fraction
    of queries `label`'s default unknown threshold would reject."""
    loaded = load_checkpoint(ckpt)
    for way, shot in WITHIN_ALPHABET_PROTOCOLS:
        if (result_key(within_alphabet_label(label), way, shot) in loaded.evaluation
                and not ctx.reeval):
            continue
        sh(ctx.log, name, [*EXE, "eval", "--checkpoint", str(ckpt), "--data",
                           omniglot("evaluation"), "--way", str(way), "--shot", str(shot),
                           "--episodes", str(ctx.eval_episodes(name, way)), "--seed", "0",
                           "--device", "auto", "--within-alphabet", "--unknown-threshold",
                           "--write-results", "--label", label], kind="eval")


def step_eval_omniglot(ctx: Ctx) -> None:
    """The test-time evaluations (augmentation, transductive) of the bundled Omniglot
    checkpoints and of the papers'-protocol runs in this budget's folder (no training;
    what is recorded already is skipped)."""
    for name in OMNIGLOT_TRAIN:
        ckpt = ctx.installed(name)
        if ckpt.exists():
            omniglot_eval(ctx, name, ckpt, plain=False)
            within_alphabet_eval(ctx, name, ckpt)
    for name in PAPER_TRAIN:
        best = ctx.runs / name / "best.safetensors"
        if best.exists():
            omniglot_eval(ctx, name, best, plain=False, **paper_eval_args())


def paper_eval_args() -> dict[str, Any]:
    """:func:`omniglot_eval`'s arguments for the papers' protocol."""
    return {"classes": "vinyals_test", "label": "omniglot-vinyals-test",
            "data": [omniglot("background"), omniglot("evaluation")]}


def step_eval_natural(ctx: Ctx) -> None:
    """Every natural-* checkpoint (and the baseline) on Caltech test / GTSRB / CIFAR-10."""
    targets = {"natural-baseline": ctx.runs / "natural-baseline.safetensors",
               **{n: ctx.installed(n) for n in NATURAL_CPU if ctx.installed(n).exists()}}
    if ctx.budget == "full":
        for name, path in targets.items():
            for label, (data, classes) in natural_eval_sets().items():
                for way, shot in NATURAL_PROTOCOLS:
                    cmd = [*EXE, "eval", "--checkpoint", str(path), "--data", data, "--way",
                           str(way), "--shot", str(shot), "--episodes", str(EVAL_EPISODES),
                           "--seed", "0", "--device", "auto", "--write-results",
                           "--label", label]
                    if classes:
                        cmd += ["--classes", classes]
                    sh(ctx.log, name, cmd, kind="eval")
        return
    cache = feature_cache(ctx)
    results: dict[str, Any] = {}
    wanted = [result_key(lab, way, shot) for lab in natural_eval_sets()
              for way, shot in NATURAL_PROTOCOLS]
    for name, path in targets.items():
        ckpt = load_checkpoint(path)
        if all(k in ckpt.evaluation for k in wanted):
            print(f"[eval-natural] {name}: already evaluated")
            results[name] = {k: ckpt.evaluation[k] for k in wanted}
            continue
        model = head_model(ckpt)
        t0 = time.time()
        for label in natural_eval_sets():
            x, y, _ = cache[label]
            for way, shot in NATURAL_PROTOCOLS:
                r = evaluate_features(model, x, y, way, shot, EVAL_EPISODES)
                key = result_key(label, way, shot)
                record_result(path, key, {**r.to_dict(), "data": label,
                                          "how": "cached stem+blocks features (ONNX Runtime)"
                                          ", same sampler/seed as fewshot-studio eval"})
                results.setdefault(name, {})[key] = r.to_dict()
                print(f"[eval-natural] {name} {key}: {r}", flush=True)
        ctx.log.add(name, {"kind": "eval", "cmd": ".venv/bin/python "
                           "scripts/train_checkpoints.py --budget cpu --steps eval-natural",
                           "wall_s": round(time.time() - t0, 1), "hardware": hardware()},
                    replace=False)
    # the baseline's variants (evidence for the choices; kept from earlier runs)
    path = ctx.runs / "natural_results.json"
    done = json.loads(path.read_text()) if path.exists() else {}
    for variant in BASELINE_VARIANTS:
        if variant in done and not ctx.reeval:
            results[variant] = done[variant]
            continue
        model = head_model(baseline_variant(ctx, variant))
        for label in natural_eval_sets():
            x, y, _ = cache[label]
            for way, shot in NATURAL_PROTOCOLS:
                r = evaluate_features(model, x, y, way, shot, EVAL_EPISODES)
                results.setdefault(variant, {})[result_key(label, way, shot)] = r.to_dict()
                print(f"[eval-natural] {variant} {label} {way}w{shot}s: {r}")
    path.write_text(json.dumps({**done, **results}, indent=1))


def baseline_variant(ctx: Ctx, variant: str) -> Checkpoint:
    """The baseline checkpoint with :data:`BASELINE_VARIANTS`' changes to its spec."""
    base = load_checkpoint(ctx.runs / "natural-baseline.safetensors")
    changes = BASELINE_VARIANTS[variant][1]
    base.model = {k: {**v, **changes.get(k, {})} if isinstance(v, dict) else v
                  for k, v in base.model.items()}
    return base


def step_paired(ctx: Ctx) -> None:
    """cpu budget: paired differences (model - baseline) on the Caltech test episodes (the
    same 1000 episodes for both): mean and 95% CI of the per-episode differences."""
    cache = feature_cache(ctx)
    x, y, _ = cache["caltech101-test"]
    base = head_model(load_checkpoint(ctx.runs / "natural-baseline.safetensors"))
    path = ctx.runs / "natural_results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    paired: dict[str, Any] = {}
    models = {"natural-baseline-multilevel": baseline_variant(ctx, "natural-baseline-multilevel"),
              **{name: load_checkpoint(ctx.installed(name)) for name in NATURAL_CPU
                 if ctx.installed(name).exists()}}
    for way, shot in NATURAL_PROTOCOLS:
        b = evaluate_features(base, x, y, way, shot, EVAL_EPISODES).per_episode
        for name, ckpt in models.items():
            if name in NATURAL_CPU and ckpt.description == BASELINE_DESCRIPTION:
                continue  # the baseline shipped as natural-protonet
            m = evaluate_features(head_model(ckpt), x, y, way, shot, EVAL_EPISODES).per_episode
            mean, ci = confidence_interval([u - v for u, v in zip(m, b, strict=True)])
            paired.setdefault(name, {})[f"caltech101-test {way}w{shot}s"] = {
                "diff": mean, "ci95": ci, "episodes": len(m)}
            print(f"[paired] {name} - baseline, caltech101-test {way}w{shot}s: "
                  f"{100 * mean:+.2f} +- {100 * ci:.2f} points")
    results["paired"] = paired
    path.write_text(json.dumps(results, indent=1))
