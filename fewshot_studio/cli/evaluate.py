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
from typing import TYPE_CHECKING, Any

from fewshot_studio.cli import help_texts
from fewshot_studio.progress import ProgressBar, run_with_bar

if TYPE_CHECKING:
    from fewshot_studio.training.evaluate import EvalResult


def add_episode_args(p: argparse.ArgumentParser, classes_help: str, episodes: int) -> None:
    """The arguments shared by the commands that run fixed episodes of a checkpoint on
    class-folder data (``eval``, ``calibrate``)."""
    p.add_argument("--checkpoint", required=True, help="a bundled name or a .safetensors file")
    p.add_argument("--data", action="append", nargs="+", required=True, metavar="PATH",
                   help="class-folder dataset: folder or .zip (repeatable)")
    p.add_argument("--classes", metavar="FILE|SPLIT",
                   help=f"{classes_help}: a file with one class per line or a split name "
                        "(e.g. vinyals_test)")
    p.add_argument("--splits-dir", help="folder of vinyals_*.txt (default: the shared data)")
    p.add_argument("--way", type=int, default=5,
                   help="classes per episode (default %(default)s)")
    p.add_argument("--shot", type=int, default=1,
                   help="examples per class in each episode (default %(default)s)")
    p.add_argument("--query", type=int, default=None,
                   help="queries per class (default: 15, or what the smallest class allows, "
                        "e.g. 20 - K on Omniglot for K > 5)")
    p.add_argument("--episodes", type=int, default=episodes,
                   help="number of fixed episodes (default %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the episode sampler: the same seed, the same episodes "
                        "(default %(default)s)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where the model runs (default %(default)s: CUDA when available)")


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
    p.set_defaults(func=run)


def result_key(label: str, way: int, shot: int) -> str:
    return f"{label} {way}w{shot}s"


def transductive_label(label: str, iters: int) -> str:
    """The label ``eval --transductive ITERS --write-results`` records its results under."""
    return f"{label} transductive x{iters}"


def tta_label(label: str, views: int) -> str:
    """The label ``eval --tta VIEWS --write-results`` records its results under (before any
    transductive suffix)."""
    return f"{label} TTA x{views}"


def evaluate_with_bar(model: Any, images: Any, preprocess: Any, way: int, shot: int,
                      query: int | None, episodes: int, seed: int, device: Any,
                      label: str = "eval", transductive: int = 0, tta: int = 0,
                      within_alphabet: bool = False, unknown_threshold: float | None = None,
                      temperature: float = 1.0) -> EvalResult:
    """:func:`~fewshot_studio.training.evaluate.evaluate_iter` behind a progress bar named
    ``label``; returns its :class:`EvalResult`."""
    from fewshot_studio.training.evaluate import EvalResult, evaluate_iter

    return run_with_bar(
        evaluate_iter(model, images, preprocess, way, shot, query, episodes, seed, device,
                      transductive, tta, within_alphabet, unknown_threshold, temperature),
        ProgressBar(label, unit="ep"), EvalResult)


def within_alphabet_label(label: str) -> str:
    """The label ``eval --within-alphabet --write-results`` records its results under."""
    return f"{label} within-alphabet"


def data_paths(args: argparse.Namespace) -> list[str]:
    """The ``--data`` paths, flattened and with ``~`` expanded."""
    return [str(Path(x).expanduser()) for group in args.data for x in group]


def load_for_episodes(args: argparse.Namespace) -> tuple[Path, Any, Any, Any, Any]:
    """From the :func:`add_episode_args` arguments: ``(checkpoint path, Checkpoint, model in
    eval mode on the device, InMemoryImages, device)``; one-line UserErrors on bad input."""
    from fewshot_studio.errors import UserError
    from fewshot_studio.io.checkpoint import load_checkpoint
    from fewshot_studio.paths import resolve_checkpoint
    from fewshot_studio.training.distributed import resolve_device
    from fewshot_studio.training.train_data import load_eval_images

    path = resolve_checkpoint(args.checkpoint)
    ckpt = load_checkpoint(path)
    device = resolve_device(args.device)
    images = load_eval_images(data_paths(args), ckpt.preprocess, args.classes, args.splits_dir,
                              device)
    try:
        model = ckpt.build(device)
    except (KeyError, RuntimeError, TypeError, ValueError) as e:
        raise UserError(f"{path}: cannot build the model it describes ({e})") from None
    return path, ckpt, model, images, device


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
    result = evaluate_with_bar(model, images, ckpt.preprocess, args.way, args.shot, args.query,
                               args.episodes, args.seed, device,
                               transductive=args.transductive, tta=args.tta,
                               within_alphabet=args.within_alphabet,
                               unknown_threshold=args.unknown_threshold,
                               temperature=ckpt.temperature)
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
        label = args.label or "+".join(Path(d).stem for d in data)
        if args.classes:
            label += f" [{Path(args.classes).stem}]"
        if args.within_alphabet:
            label = within_alphabet_label(label)
        if args.tta:
            label = tta_label(label, args.tta)
        if args.transductive:
            label = transductive_label(label, args.transductive)
        record_result(path, result_key(label, args.way, args.shot), {
            **result.to_dict(), "data": [Path(d).name for d in data],
            "classes": args.classes, "device": str(device)})
        print(f"recorded as {result_key(label, args.way, args.shot)!r} in {path}",
              file=sys.stderr)
    return 0


def record_result(path: Path, key: str, value: dict) -> None:
    """Add ``key: value`` to the checkpoint's evaluation metadata, keeping its weights'
    dtype (fp16 files stay fp16)."""
    import torch
    from safetensors import safe_open

    from fewshot_studio.io.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(path)
    with safe_open(str(path), framework="pt") as f:
        half = any(f.get_slice(k).get_dtype() == "F16" for k in f.keys())  # noqa: SIM118
    ckpt.evaluation = {**ckpt.evaluation, key: value}
    save_checkpoint(path, ckpt, dtype=torch.float16 if half else None)
