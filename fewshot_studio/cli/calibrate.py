"""``fewshot-studio calibrate``: fit a temperature (Guo et al. 2017) so that the confidences
the app shows (and its "unknown" threshold) mean what they say.

    fewshot-studio calibrate --checkpoint omniglot-protonet \\
        --data images_background.zip --classes val_classes.txt \\
        --way 5 --shot 1 --episodes 200 --seed 0 [--write]
    temperature: 3.2100
    NLL: 0.2500 -> 0.0700
    ECE (15 bins): 5.10% -> 0.90%

Fit it on validation classes (never on the classes you report on). ``--write`` records it
in the checkpoint's metadata (``evaluation["calibration"]``), keeping the weights' dtype;
the labeling engine then divides logits by it before the softmax.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fewshot_studio.cli import help_texts
from fewshot_studio.cli.episode_args import add_episode_args, data_paths, load_for_episodes
from fewshot_studio.progress import ProgressBar, run_with_bar

if TYPE_CHECKING:
    from fewshot_studio.training.calibrate import CalibrationResult


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``calibrate``."""
    p = subparsers.add_parser(
        "calibrate", help="fit a softmax temperature so confidences are calibrated",
        **help_texts(
            "Fit one temperature T (logits / T) minimising the NLL of the query labels over "
            "fixed episodes of held-out classes; prints T, NLL and 15-bin ECE before/after. "
            "--write stores T in the checkpoint. Fit it on validation classes, never on the "
            "classes you report on.",
            "fewshot-studio calibrate --checkpoint omniglot-protonet \\\n"
            "    --data images_background.zip --classes val_classes.txt \\\n"
            "    --way 5 --shot 1 --episodes 200 --write"))
    add_episode_args(p, classes_help="fit on these (validation) classes only", episodes=200)
    p.add_argument("--write", action="store_true",
                   help="record T in the checkpoint file (atomic rewrite, same weight dtype)")
    p.add_argument("--check", action="store_true",
                   help="fit nothing: measure NLL/ECE at T = 1 and at the checkpoint's "
                        "recorded temperature (e.g. on test classes after --write)")
    p.set_defaults(func=run)


def calibrate_with_bar(model: Any, images: Any, preprocess: Any, way: int, shot: int,
                       query: int | None, episodes: int, seed: int, device: Any,
                       temperature: float | None = None) -> CalibrationResult:
    """:func:`~fewshot_studio.training.calibrate.fit_temperature_iter` behind a progress
    bar; returns its :class:`CalibrationResult`."""
    from fewshot_studio.training.calibrate import CalibrationResult, fit_temperature_iter

    return run_with_bar(
        fit_temperature_iter(model, images, preprocess, way, shot, query, episodes, seed,
                             device, temperature),
        ProgressBar("calibrate", unit="ep"), CalibrationResult)


def run(args: argparse.Namespace) -> int:
    """Fit (or with ``--check`` measure) the temperature; ``--write`` records it."""
    from fewshot_studio.errors import UserError

    if args.episodes < 1:
        raise UserError("--episodes must be at least 1")
    if args.way < 2:
        raise UserError("--way must be at least 2")
    if args.check and args.write:
        raise UserError("--check measures the recorded temperature; it cannot --write")
    path, ckpt, model, images, device = load_for_episodes(args)
    recorded = None
    if args.check:
        recorded = ckpt.temperature
    result = calibrate_with_bar(model, images, ckpt.preprocess, args.way, args.shot,
                                args.query, args.episodes, args.seed, device, recorded)
    if args.check:
        print("recorded temperature (not fitted):", file=sys.stderr)
    print(result)
    if args.write:
        from fewshot_studio.io.checkpoint import CALIBRATION_KEY
        from fewshot_studio.training.records import record_result

        record_result(path, CALIBRATION_KEY, result.to_metadata(
            data=[Path(d).name for d in data_paths(args)], classes=args.classes))
        print(f"recorded temperature {result.temperature:.4f} in {path}", file=sys.stderr)
    return 0
