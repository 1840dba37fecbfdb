"""``fewshot-studio train``: episodic meta-training with a progress bar.

    fewshot-studio train --method protonet --backbone conv4 --data images_background.zip \\
        --way 60 --shot 5 --query 5 --episodes 20000 --rotations 0 90 180 270 --out runs/x

Under ``torchrun --nproc_per_node N -m fewshot_studio train ...`` it trains data-parallel.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from fewshot_studio.cli import help_texts
from fewshot_studio.data.preprocess import Preprocess
from fewshot_studio.errors import UserError
from fewshot_studio.progress import ProgressBar
from fewshot_studio.registry import LazyNames, Registry
from fewshot_studio.training.config import AUGMENTS, DEVICES, SCHEDULES, SPLITS, TrainConfig


def _kv(text: str) -> tuple[str, Any]:
    """``key=value`` with a JSON value (bare words stay strings)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key.strip().replace("-", "_"), json.loads(value)
    except json.JSONDecodeError:
        return key.strip().replace("-", "_"), value


def _backbones() -> Registry[Any, Any]:
    from fewshot_studio.models import BACKBONES

    return BACKBONES


def _method_names() -> list[str]:
    from fewshot_studio.models import METHODS

    return METHODS.names()


def _trainable_backbones() -> list[str]:
    return [e.name for e in _backbones().entries() if e.cfg.trainable]


# the registries' names, read when needed (building the parser imports no torch)
METHOD_NAMES = LazyNames(_method_names)
BACKBONE_NAMES = LazyNames(_trainable_backbones)


def register(subparsers: argparse._SubParsersAction) -> None:
    d = TrainConfig()
    p = subparsers.add_parser(
        "train", help="meta-train a few-shot model on class-folder data",
        **help_texts(
            "Meta-train a few-shot model episodically. Writes best.safetensors, "
            "last.safetensors, resume.safetensors and metrics.csv into --out.",
            "fewshot-studio train --method protonet --backbone conv4 \\\n"
            "    --data my_classes/ --val-classes 0.2 --way 5 --shot 5 --out runs/mine"))
    m = p.add_argument_group("model")
    m.add_argument("--method", default=d.method, choices=METHOD_NAMES, metavar="NAME",
                   help="a registered method: %(choices)s (default %(default)s); trains "
                        "with its defaults on every backbone")
    m.add_argument("--method-arg", action="append", type=_kv, default=[], metavar="KEY=VALUE",
                   help="method option, e.g. distance=cosine, first_order=true (repeatable)")
    m.add_argument("--backbone", default=d.backbone, choices=BACKBONE_NAMES, metavar="NAME",
                   help="a registered trainable backbone: %(choices)s (default "
                        "%(default)s)")
    m.add_argument("--backbone-arg", action="append", type=_kv, default=[], metavar="KEY=VALUE",
                   help="backbone option, e.g. hidden=64, pretrained=true (repeatable)")
    m.add_argument("--image-size", type=int, help="input side in px (default: the "
                   "backbone's, 28 for conv4)")
    m.add_argument("--channels", type=int, choices=(1, 3), help="1 grayscale, 3 RGB "
                   "(default: the backbone's)")
    m.add_argument("--mean", type=float, nargs="+", help="per-channel mean on [0, 1]")
    m.add_argument("--std", type=float, nargs="+", help="per-channel std on [0, 1]")
    m.add_argument("--resize", choices=("squash", "center_crop"),
                   help="default: squash for 1 channel, center_crop for 3")

    g = p.add_argument_group("data")
    g.add_argument("--data", action="append", nargs="+", default=[], metavar="PATH",
                   help="class-folder dataset: folder or .zip (repeatable)")
    g.add_argument("--split", choices=SPLITS, default=None,
                   help="how validation classes are chosen (default: random, or files when "
                        "--val-classes is a file)")
    g.add_argument("--val-classes", metavar="FRACTION|FILE",
                   help=f"fraction of classes held out (default {d.val_fraction}) or a file "
                        "with one class per line")
    g.add_argument("--train-classes", metavar="FILE", help="file with one class per line")
    g.add_argument("--splits-dir", help="folder of vinyals_*.txt (default: the shared data)")
    g.add_argument("--rotations", type=int, nargs="+", default=list(d.rotations),
                   help="rotations as new classes, e.g. 0 90 180 270 (Omniglot)")
    g.add_argument("--augment", choices=AUGMENTS, default=d.augment,
                   help="omniglot: small affine warps + stroke thickness; photo: random "
                        "resized crop, flip, colour jitter")
    g.add_argument("--augment-strength", type=float, default=d.augment_strength,
                   help="scales every augmentation range (default %(default)s)")

    e = p.add_argument_group("episodes and optimisation")
    e.add_argument("--way", type=int, default=d.way,
                   help="classes per training episode (default %(default)s)")
    e.add_argument("--shot", type=int, default=d.shot,
                   help="support examples per class (default %(default)s)")
    e.add_argument("--query", type=int, default=d.query,
                   help="query examples per class (default %(default)s)")
    e.add_argument("--meta-batch", type=int, default=d.meta_batch, help="tasks per step")
    e.add_argument("--within-alphabet-fraction", type=float,
                   default=d.within_alphabet_fraction, metavar="F",
                   help="this fraction of the training episodes takes all its classes from "
                        "one alphabet (the first folder level), support and query by "
                        "different drawers (file-name suffix _NN): Lake et al.'s hard "
                        "episodes (default %(default)s)")
    e.add_argument("--episodes", type=int, default=None,
                   help=f"optimiser steps (default {d.episodes}; with --resume: the run's)")
    e.add_argument("--lr", type=float, default=d.lr,
                   help="peak learning rate (default %(default)s)")
    e.add_argument("--schedule", choices=SCHEDULES, default=d.schedule,
                   help="learning-rate schedule after the warm-up (default %(default)s)")
    e.add_argument("--warmup", type=int, default=d.warmup,
                   help="episodes of linear warm-up (default %(default)s)")
    e.add_argument("--step-size", type=int, default=d.step_size,
                   help="step schedule: episodes between decays (default %(default)s)")
    e.add_argument("--gamma", type=float, default=d.gamma,
                   help="step schedule: factor per decay (default %(default)s)")
    e.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help="AdamW weight decay (default %(default)s)")
    e.add_argument("--grad-clip", type=float, default=None, metavar="NORM",
                   help="clip the gradient norm to NORM (default: no clipping)")

    v = p.add_argument_group("validation")
    v.add_argument("--val-every", type=int, default=d.val_every,
                   help="validate every this many episodes (default %(default)s)")
    v.add_argument("--val-episodes", type=int, default=d.val_episodes,
                   help="fixed validation episodes (default %(default)s)")
    v.add_argument("--val-way", type=int, default=d.val_way,
                   help="classes per validation episode (default %(default)s)")
    v.add_argument("--val-shot", type=int, default=d.val_shot,
                   help="examples per class in validation episodes (default %(default)s)")
    v.add_argument("--val-query", type=int, default=None,
                   help="default: 15, or what the smallest validation class allows")
    v.add_argument("--val-within-alphabet", action="store_true",
                   help="validate on within-alphabet episodes (as `eval --within-alphabet`; "
                        "hold out whole alphabets, e.g. --split groups)")

    r = p.add_argument_group("run")
    r.add_argument("--out", default=d.out, help="run directory (default %(default)s)")
    r.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint, with the "
                        "run's stored settings (only --episodes, --device and --time-limit "
                        "apply)")
    r.add_argument("--seed", type=int, default=d.seed,
                   help="seed of sampling, augmentation and initialisation "
                        "(default %(default)s)")
    r.add_argument("--device", choices=DEVICES, default=d.device,
                   help="where to train (default %(default)s: CUDA when available)")
    r.add_argument("--amp", action="store_true", help="bfloat16 autocast on CUDA")
    r.add_argument("--compile", action="store_true",
                   help="torch.compile the training step (CUDA graphs on CUDA; ProtoNet "
                        "Conv4 60-way: 2.5x the episodes/s on an H100; compiling takes ~40 s)")
    r.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                   help="stop (with checkpoints) after this long")
    r.add_argument("--fit-schedule", action="store_true",
                   help="with --time-limit: the cosine schedule runs on the episodes or the "
                        "time, whichever is further along, so a run stopped by its time "
                        "limit still ends at the last learning rate")
    r.add_argument("--fp16-checkpoints", action="store_true",
                   help="store best/last weights as float16 (half the size)")
    r.add_argument("--name", default="", help="checkpoint name (default: the run folder's)")
    r.add_argument("--description", default="",
                   help="a line about the checkpoint, stored in its metadata")
    r.add_argument("--log-every", type=int, default=d.log_every,
                   help="episodes between log lines and metrics.csv rows "
                        "(default %(default)s)")
    p.set_defaults(func=run)


def default_preprocess(backbone: str, image_size: int | None = None,
                       channels: int | None = None, mean: list[float] | None = None,
                       std: list[float] | None = None, resize: str | None = None) -> Preprocess:
    """Preprocessing for ``backbone``: explicit values win; else the ``preprocess`` its
    registry entry declares; for a channel count other than that entry's, 1 channel: mean 0 /
    std 1, squash; 3 channels: mean 0.5 / std 0.5, centre crop."""
    try:
        base = _backbones().get(backbone).cfg.preprocess
    except KeyError as e:
        raise UserError(str(e).strip("'\"")) from None
    ch = channels or base.channels
    size = image_size or base.image_size
    if ch == base.channels:
        dm, ds, dr = base.mean, base.std, base.resize
    else:
        dm, ds = ((0.0,), (1.0,)) if ch == 1 else ((0.5,) * 3, (0.5,) * 3)
        dr = "squash" if ch == 1 else "center_crop"
    mean_t = tuple(mean) if mean else dm
    std_t = tuple(std) if std else ds
    for name, t in (("--mean", mean_t), ("--std", std_t)):
        if len(t) not in (1, ch):
            raise UserError(f"{name} needs 1 or {ch} values")
    return Preprocess(image_size=size, channels=ch, mean=mean_t, std=std_t,
                      resize=resize or dr)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    data = tuple(str(Path(x).expanduser()) for group in args.data for x in group)
    split = args.split
    val_fraction = TrainConfig.val_fraction
    val_classes = None
    if args.val_classes is not None:
        try:
            val_fraction = float(args.val_classes)
        except ValueError:
            val_classes = args.val_classes
            split = split or "files"
    if args.train_classes and split is None:
        split = "files"
    pre = default_preprocess(args.backbone, args.image_size, args.channels, args.mean,
                             args.std, args.resize)
    return TrainConfig(
        method=args.method, method_kwargs=dict(args.method_arg), backbone=args.backbone,
        backbone_kwargs=dict(args.backbone_arg), preprocess=pre, data=data,
        split=split or "random", val_fraction=val_fraction, train_classes=args.train_classes,
        val_classes=val_classes, splits_dir=args.splits_dir, rotations=tuple(args.rotations),
        way=args.way, shot=args.shot, query=args.query, meta_batch=args.meta_batch,
        episodes=args.episodes or TrainConfig.episodes, lr=args.lr, schedule=args.schedule,
        warmup=args.warmup, step_size=args.step_size, gamma=args.gamma,
        weight_decay=args.weight_decay, grad_clip=args.grad_clip, augment=args.augment,
        augment_strength=args.augment_strength,
        val_every=args.val_every, val_episodes=args.val_episodes, val_way=args.val_way,
        val_shot=args.val_shot, val_query=args.val_query,
        val_within_alphabet=args.val_within_alphabet,
        within_alphabet_fraction=args.within_alphabet_fraction, seed=args.seed,
        device=args.device,
        amp=args.amp, out=args.out, name=args.name, description=args.description,
        log_every=args.log_every, time_limit_s=args.time_limit,
        fit_schedule=args.fit_schedule, compile=args.compile,
        fp16_checkpoints=args.fp16_checkpoints,
    )


def resume_config(args: argparse.Namespace) -> TrainConfig:
    """The config stored in ``--out``'s resume state, with ``--episodes``, ``--device`` and
    ``--time-limit`` overridable."""
    from fewshot_studio.training.trainer import RESUME, load_train_state

    _, meta = load_train_state(Path(args.out).expanduser() / RESUME)
    cfg = TrainConfig.from_dict(meta["config"])
    changes: dict[str, Any] = {"device": args.device, "time_limit_s": args.time_limit,
                               "out": str(Path(args.out).expanduser()),
                               "fit_schedule": cfg.fit_schedule and bool(args.time_limit)}
    if args.episodes:
        changes["episodes"] = args.episodes
    return cfg.with_(**changes)


def run(args: argparse.Namespace) -> int:
    from fewshot_studio.training.distributed import env_world_size
    from fewshot_studio.training.trainer import TrainResult, train

    cfg = resume_config(args) if args.resume else config_from_args(args)
    main_rank = int(os.environ.get("RANK", "0")) == 0
    bar = ProgressBar("train", unit="ep", stream=sys.stderr if main_rank else _Null())
    result: TrainResult | None = None
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        gen = train(cfg, resume=args.resume)
        try:
            for p in gen:
                bar.update(p, force=p.done == 0 or isinstance(p.payload, TrainResult))
                if isinstance(p.payload, TrainResult):
                    result = p.payload
        except KeyboardInterrupt:
            gen.close()
            bar.close()
            if main_rank:
                print(f"interrupted: resumable checkpoint in {cfg.out} "
                      f"(fewshot-studio train --resume --out {cfg.out})", file=sys.stderr)
            return 130
        finally:
            bar.close()
    if result is None or not main_rank:
        return 0
    ws = env_world_size()
    print(f"trained {result.step} episodes{f' on {ws} processes' if ws > 1 else ''}; "
          f"run dir: {result.run_dir}")
    if result.best_val is not None:
        print(f"best validation {result.best_val}")
    print(f"best checkpoint: {result.best_path}")
    return 0


class _Null:
    """A stream that drops everything (the progress bar of ranks other than 0)."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass
