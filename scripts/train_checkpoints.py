#!/usr/bin/env python
"""Train, evaluate and document every bundled checkpoint: one command, unattended.

    .venv/bin/python scripts/train_checkpoints.py --budget full   # a CUDA GPU (issue 5's schedules)
    .venv/bin/python scripts/train_checkpoints.py --budget cpu    # what a 2-core CPU affords

Steps (``--steps a,b,...``; default: every step of the budget, in this order):

* ``splits``             check / write resources/splits/caltech101_{train,val,test}.txt
                         (60/20/21 classes, BACKGROUND_Google excluded, seeded shuffle)
* ``natural-baseline``   ImageNet-pretrained EfficientNet-Lite0 + cosine ProtoNet, no
                         meta-training (the baseline every natural-* model must beat)
* ``omniglot-protonet``, ``omniglot-relation``, ``omniglot-maml``: ``fewshot-studio train``
                         on images_background (rotations as classes, held-out background
                         classes for validation), then ``fewshot-studio eval --write-results``
                         on images_evaluation: 5w1s, 5w5s, 20w1s, 20w5s, 1000 episodes, 15
                         queries (20 - K beyond K = 5)
* ``paper-protonet``, ``paper-relation``, ``paper-maml`` (full budget): the papers' protocol,
                         Vinyals trainval -> test; not shipped, reported in the card
* ``natural-protonet``, ``natural-relation``, ``natural-maml``:
    - full: ``fewshot-studio train`` from the pretrained Lite0 on the Caltech-101 training
      classes (photo augmentation), validation on the Caltech validation classes;
    - cpu: Lite0 end to end is out of reach on 2 cores (~5-30 images/s forward only), so the
      stem and blocks stay frozen at their ImageNet weights, their outputs (320x7x7 per image)
      are computed once (ONNX Runtime) and only the last 1x1 conv + BN of the backbone and
      the method's own parameters are meta-trained on those cached features
      (``fewshot_studio.training.cached``, the trainer's cached-feature mode: same
      optimiser, schedule, step, episodes, losses and model classes).
      A model is shipped only if it beats the baseline on the Caltech *validation* classes;
      otherwise the baseline stays (natural-protonet) or the file says so.
* ``eval-natural``       every natural-* checkpoint on Caltech test classes, GTSRB and
                         CIFAR-10 subsets, 5w1s and 5w5s, 1000 episodes, 15 queries, seed 0
                         (full: ``fewshot-studio eval``; cpu: the same sampler and seed on
                         cached stem+blocks features), recorded in the checkpoint metadata
* ``card``               write checkpoints/README.md from the checkpoints' metadata and
                         runs/bundled-<budget>/commands.json

Every command run is logged with its wall time in runs/bundled-<budget>/commands.json; the
model card quotes them. Trainings append to /tmp/train_<name>.log.

The steps live in ``scripts/bundled/``: ``common`` (paths, command log, ``Ctx``), ``budgets``
(the training arguments), ``trainings`` / ``omniglot`` / ``natural`` (the training steps),
``evaluation`` and ``card`` (+ ``card_notes``).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "scripts")]

from bundled.budgets import LEASE_TRAIN_S  # noqa: E402
from bundled.card import step_card  # noqa: E402
from bundled.common import Ctx  # noqa: E402
from bundled.evaluation import step_eval_natural, step_eval_omniglot, step_paired  # noqa: E402
from bundled.natural import make_natural_step, step_natural_baseline, step_splits  # noqa: E402
from bundled.omniglot import make_omniglot_step, make_paper_step  # noqa: E402

STEPS: dict[str, Callable[[Ctx], None]] = {
    "splits": step_splits,
    "natural-baseline": step_natural_baseline,
    "omniglot-protonet": make_omniglot_step("omniglot-protonet"),
    "natural-relation": make_natural_step("natural-relation"),
    "natural-maml": make_natural_step("natural-maml"),
    "natural-protonet": make_natural_step("natural-protonet"),
    "omniglot-relation": make_omniglot_step("omniglot-relation"),
    "omniglot-maml": make_omniglot_step("omniglot-maml"),
    "paper-protonet": make_paper_step("paper-protonet"),
    "paper-relation": make_paper_step("paper-relation"),
    "paper-maml": make_paper_step("paper-maml"),
    "eval-natural": step_eval_natural,
    "eval-omniglot": step_eval_omniglot,
    "paired": step_paired,
    "card": step_card,
}
DEFAULT_STEPS = {"cpu": [s for s in STEPS if not s.startswith("paper-") and s != "eval-omniglot"],
                 # "paired" needs the cached features: cpu only; the omniglot steps already
                 # run eval-omniglot's evaluations
                 "full": [s for s in STEPS if s not in ("paired", "eval-omniglot")],
                 # the lease: Omniglot only (the photo models stay the cpu budget's)
                 "gpu": [s for s in STEPS if s.startswith(("omniglot-", "paper-"))]}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budget", choices=("cpu", "gpu", "full"), required=True,
                   help="cpu: a 2-core CPU; gpu: one short GPU lease (~15 min of an H100); "
                        "full: issue 5's schedules on a GPU")
    p.add_argument("--steps", help="comma-separated steps (default: all of the budget): "
                   + ", ".join(STEPS))
    p.add_argument("--runs", help="run folder (default runs/bundled-<budget>)")
    p.add_argument("--resume", action="store_true", help="continue interrupted trainings")
    p.add_argument("--retrain", action="store_true", help="start trainings over")
    p.add_argument("--keep-existing", action="store_true",
                   help="natural-baseline: do not overwrite checkpoints/natural-protonet")
    p.add_argument("--time-limit", type=float, default=None,
                   help="cpu budget: wall-clock limit per cached-feature training (s); gpu "
                        f"budget: per Omniglot training (default {LEASE_TRAIN_S})")
    p.add_argument("--reeval", action="store_true",
                   help="evaluate again what a checkpoint has results for already")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads (cpu)")
    p.add_argument("--checkpoints", help="where to install checkpoints (default checkpoints/;"
                   " for trial runs)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="cpu budget: cap the cached-feature trainings' steps (trial runs)")
    args = p.parse_args(argv)
    ctx = Ctx(args)
    steps = args.steps.split(",") if args.steps else DEFAULT_STEPS[args.budget]
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        p.error(f"unknown steps: {', '.join(unknown)}")
    for s in steps:
        t0 = time.time()
        print(f"== {s} ({args.budget}) ==", flush=True)
        STEPS[s](ctx)
        print(f"== {s} done in {time.time() - t0:.0f} s ==", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
