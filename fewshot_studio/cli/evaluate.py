"""``fewshot-studio eval``: mean accuracy +- 95% CI over fixed episodes.

    fewshot-studio eval --checkpoint omniglot-protonet --data images_evaluation.zip \\
        --way 5 --shot 1 --query 15 --episodes 1000 --seed 0
    accuracy: 96.68% +- 0.27% (95% CI, 1000 episodes)

``--within-alphabet``: Lake et al.'s (2015) harder protocol: every episode's classes come from
one alphabet (the first folder level, e.g. ``Angelic/character01``; alphabets with fewer than
``--way`` characters are skipped) and its support and query images from different drawers
(the file-name suffix ``_NN``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fewshot_studio.cli import help_texts
from fewshot_studio.cli.episode_args import add_episode_args, data_paths, load_for_episodes
from fewshot_studio.training.records import eval_label, record_result, result_key


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval", help="measure a checkpoint's few-shot accuracy on class-folder data",
        **help_texts(
            "Evaluate a checkpoint on fixed N-way K-shot episodes (deterministic for a seed); "
            "prints mean accuracy +- 95% CI (1.96 std / sqrt(n)).",
            "fewshot-studio eval --checkpoint omniglot-protonet \\\n"
            "    --data images_evaluation.zip --way 20 --shot 1 --within-alphabet"))
    add_episode_args(p, classes_help="evaluate on these classes only", episodes=1000)
    p.add_argument("--write-results", action="store_true",
                   help="record the result in the checkpoint's evaluation metadata")
    p.add_argument("--label", default=None,
                   help="name of the result in the metadata (default: the data's name)")
    p.add_argument("--transductive", nargs="?", type=int, const=None, default=0,
                   metavar="ITERS",
                   help="refine the prototypes over each episode's queries by soft k-means "
                        "(ITERS iterations; without a number, as many as the app's "
                        "'Transductive refinement' option runs); ProtoNet, mean-aggregate "
                        "Relation Network, ANIL MAML (the Proto-MAML head's prototypes)")
    p.add_argument("--tta", nargs="?", type=int, const=None, default=0, metavar="VIEWS",
                   help="test-time augmentation: average every image's features over VIEWS "
                        "fixed views of it (without a number, as many as the app's "
                        "'Test-time augmentation' option uses): small warps and stroke "
                        "changes for grayscale characters, the mirror image for photos")
    p.add_argument("--within-alphabet", action="store_true",
                   help="Lake et al.'s harder protocol: each episode's classes from one "
                        "alphabet (the first folder level; alphabets with fewer than --way "
                        "classes are skipped), support and query images by different drawers "
                        "(the file-name suffix _NN, as in Omniglot's 0965_17.png)")
    p.add_argument("--unknown-threshold", nargs="?", type=float, const=-1.0, default=None,
                   metavar="P",
                   help="also report the fraction of queries (all of them from the support's "
                        "classes) whose calibrated top probability is below P: what `label`'s "
                        "threshold rule would mark unknown (its adaptive rule falls back to "
                        "it with one example a class); without a number: label's default")
    p.add_argument("--adapt", choices=("none", "finetune"), default="none",
                   help="none: the checkpoint as it is; finetune: fine-tune a copy of it on "
                        "each episode's support set first (its last backbone blocks, the "
                        "checkpoint's own augmentation; what `label --adapt finetune` does; "
                        "seconds an episode on the CPU) (default %(default)s)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fewshot_studio.errors import UserError

    if args.episodes < 1:
        raise UserError("--episodes must be at least 1")
    if args.transductive is None:
        from fewshot_studio.engine.head import TRANSDUCTIVE_ITERS

        args.transductive = TRANSDUCTIVE_ITERS
    if args.transductive < 0:
        raise UserError("--transductive needs a number of iterations >= 1")
    from fewshot_studio.data.tta import TTA_VIEWS, effective_views, tta_kind

    if args.tta is None:
        args.tta = TTA_VIEWS
    if args.tta < 0:
        raise UserError("--tta needs a number of views >= 2")
    if args.unknown_threshold is not None and args.unknown_threshold < 0:
        from fewshot_studio.engine.api import LabelSettings

        args.unknown_threshold = LabelSettings().unknown_threshold
    if args.unknown_threshold is not None and not 0.0 <= args.unknown_threshold <= 1.0:
        raise UserError(f"--unknown-threshold must be in [0, 1], got {args.unknown_threshold}")
    path, ckpt, model, images, device = load_for_episodes(args)
    args.tta = effective_views(args.tta, tta_kind(ckpt.preprocess)) if args.tta > 1 else 0
    if args.transductive and not model.supports_refinement:
        raise UserError(f"--transductive: this {model.method_name} checkpoint has no "
                        "transductive refinement (ProtoNet, mean-aggregate Relation "
                        "Network and ANIL MAML checkpoints have)")
    from fewshot_studio.models.finetune import FinetuneSettings, can_finetune
    from fewshot_studio.training.evaluate import evaluate_with_bar

    if args.adapt == "finetune" and not can_finetune(model):
        raise UserError(f"--adapt finetune: this {model.method_name} checkpoint cannot be "
                        "fine-tuned (ProtoNet and Relation Network checkpoints with a "
                        "built-in backbone can)")

    result = evaluate_with_bar(model, images, ckpt.preprocess, args.way, args.shot, args.query,
                               args.episodes, args.seed, device,
                               transductive=args.transductive, tta=args.tta,
                               within_alphabet=args.within_alphabet,
                               unknown_threshold=args.unknown_threshold,
                               temperature=ckpt.temperature,
                               finetune=FinetuneSettings() if args.adapt == "finetune"
                               else None)
    if args.within_alphabet:
        skipped = sorted({n.partition("/")[0] for n in images.class_names}
                         - set(result.alphabets))
        print(f"within-alphabet: {len(result.alphabets)} alphabets with at least {args.way} "
              f"classes; skipped {len(skipped)}" + (f": {', '.join(skipped)}" if skipped else "")
              + ("" if result.drawers else "; no drawer suffix _NN on every file name: "
                 "support and query differ by image only"), file=sys.stderr)
    print(result)
    if args.write_results:
        data = data_paths(args)
        label = eval_label(args.label, data, args.classes, args.within_alphabet, args.tta,
                           args.transductive)
        if args.adapt == "finetune":
            label += " finetune"
        record_result(path, result_key(label, args.way, args.shot), {
            **result.to_dict(), "data": [Path(d).name for d in data],
            "classes": args.classes, "device": str(device)})
        print(f"recorded as {result_key(label, args.way, args.shot)!r} in {path}",
              file=sys.stderr)
    return 0
