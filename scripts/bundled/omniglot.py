"""The Omniglot steps of ``scripts/train_checkpoints.py``: train (``fewshot-studio train``),
install and evaluate the bundled checkpoints, and the papers'-protocol runs (not shipped)."""

from __future__ import annotations

from collections.abc import Callable

from bundled.budgets import OMNI_COMMON, OMNIGLOT_TRAIN, PAPER_TRAIN, schedule
from bundled.common import Ctx, omniglot
from bundled.evaluation import omniglot_eval, paper_eval_args, within_alphabet_eval
from bundled.trainings import continue_training, install_trained, run_training, train_cmd


def make_omniglot_step(name: str) -> Callable[[Ctx], None]:
    def step(ctx: Ctx) -> None:
        out = ctx.runs / name
        cmd = train_cmd(name, OMNI_COMMON + schedule(ctx, OMNIGLOT_TRAIN[name][ctx.budget]),
                        [omniglot("background")], out)
        best = run_training(ctx, name, cmd, out)
        continue_training(ctx, name, out)
        target = ctx.installed(name)
        install_trained(best, target)
        omniglot_eval(ctx, name, target)
        within_alphabet_eval(ctx, name, target)
    return step


def make_paper_step(name: str) -> Callable[[Ctx], None]:
    def step(ctx: Ctx) -> None:
        out = ctx.runs / name
        args = [a for a in OMNI_COMMON]
        i = args.index("--split")
        args[i + 1] = "vinyals-trainval"
        j = args.index("--val-classes")
        del args[j:j + 2]
        k = args.index("--rotations")
        del args[k:k + 5]  # the split files name the rotated classes
        if ctx.budget not in PAPER_TRAIN[name]:
            print(f"[{name}] no {ctx.budget} schedule (see PAPER_TRAIN); skipped")
            return
        cmd = train_cmd(name, args + schedule(ctx, PAPER_TRAIN[name][ctx.budget]),
                        [omniglot("background"), omniglot("evaluation")], out)
        best = run_training(ctx, name, cmd, out)
        continue_training(ctx, name, out)
        omniglot_eval(ctx, name, best, **paper_eval_args())
    return step
