"""Episodic meta-training: a generator of :class:`~fewshot_studio.progress.Progress`.

``train(config)`` checks the data (a clear :class:`UserError` before any work: missing path,
too few classes, a class with too few images), preloads every image as uint8 onto the
training device (so a GPU step never touches the CPU beyond a few sampled indices), builds
the model from the registries and meta-trains it with Adam and a schedule. Every
``val_every`` steps it measures accuracy on fixed episodes of held-out classes and writes
into the run directory:

* ``best.safetensors``: the checkpoint with the best validation accuracy;
* ``last.safetensors``: the latest checkpoint;
* ``resume.safetensors``: weights + optimiser state + RNG states + step (tensors as
  safetensors, the rest as JSON in its header; never a pickle), for ``resume=True``;
* ``metrics.csv``: step, lr, train loss/accuracy, validation accuracy +- CI, elapsed time.

Closing the generator (the GUI's cancel) or Ctrl-C saves ``last`` and ``resume`` first.
Under ``torchrun`` each rank samples its own episodes and only rank 0 writes files.

The loop lives here; data preparation in :mod:`.train_data`, the model / schedule / batch /
step pieces in :mod:`.steps` and the resume state in :mod:`.train_state` (all importable from
here too).
"""

from __future__ import annotations

import csv
import math
import os
import platform
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fewshot_studio.data.sampler import EpisodeSampler
from fewshot_studio.errors import UserError
from fewshot_studio.io.checkpoint import Checkpoint, save_checkpoint
from fewshot_studio.models import FewShotClassifier
from fewshot_studio.progress import Progress
from fewshot_studio.training import distributed
from fewshot_studio.training.config import TrainConfig
from fewshot_studio.training.evaluate import (
    EvalResult,
    evaluate,
    fixed_episodes,
    within_alphabet_args,
)

# BatchMaker, build_model, compile_step, lr_at, make_optimizer, train_step, prepare_data and
# load_train_state are also imported from here by the CLI, tests and benchmarks.
from fewshot_studio.training.steps import (
    BatchMaker,
    build_model,
    compile_step,
    lr_at,
    make_optimizer,
    train_step,
)
from fewshot_studio.training.train_data import prepare_data
from fewshot_studio.training.train_state import (
    _optimizer_from_flat,
    load_train_state,
    save_train_state,
)

BEST = "best.safetensors"
LAST = "last.safetensors"
RESUME = "resume.safetensors"
METRICS = "metrics.csv"
METRIC_FIELDS = ("step", "lr", "loss", "acc", "val_acc", "val_ci95", "elapsed_s")


@dataclass
class TrainResult:
    """The final :class:`Progress` payload. ``model`` is this process's trained model."""

    run_dir: Path
    step: int
    best_path: Path | None
    last_path: Path | None
    best_val: EvalResult | None
    skipped: list[tuple[str, str]]
    model: FewShotClassifier
    interrupted: bool = False


def validation_key(config: TrainConfig) -> str:
    """The name of the validation result in a checkpoint's evaluation metadata
    (``"validation 20w1s"``; ``" within-alphabet"`` appended for that protocol)."""
    key = f"validation {config.val_way}w{config.val_shot}s"
    return key + " within-alphabet" if config.val_within_alphabet else key


def hardware_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


class _MetricsLog:
    """``metrics.csv`` in the run dir (rank 0 only); on resume, rows after the step are
    dropped."""

    def __init__(self, path: Path, resume_step: int | None) -> None:
        self.path = path
        rows: list[dict[str, str]] = []
        if resume_step is not None and path.is_file():
            with path.open(newline="", encoding="utf-8") as f:
                rows = [r for r in csv.DictReader(f) if int(r.get("step") or 0) <= resume_step]
        with path.open("w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
            w.writeheader()
            w.writerows(rows)

    def write(self, row: dict[str, Any]) -> None:
        with self.path.open("a", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v)
                        for k, v in row.items()})


def train(config: TrainConfig, resume: bool = False) -> Iterator[Progress]:
    """Meta-train as ``config`` says, yielding :class:`Progress` (``done`` = optimiser steps,
    ``metrics`` loss / acc / val_acc / lr). The final Progress carries a
    :class:`TrainResult` as ``payload``. ``resume=True`` continues the run in
    ``config.out`` from its ``resume.safetensors`` (its step, weights, optimiser, RNG).

    Raises :class:`UserError` for bad settings or data before training starts.
    """
    config.validate()
    info = distributed.setup(config.device)
    try:
        yield from _train(config, resume, info)
    finally:
        distributed.teardown(info)


def _train(config: TrainConfig, resume: bool, info: distributed.DistInfo
           ) -> Iterator[Progress]:
    device = info.device
    if device.type == "cuda":  # fixed episode shapes: let cuDNN pick its fastest kernels
        torch.backends.cudnn.benchmark = True
    run_dir = Path(config.out).expanduser()
    state_path = run_dir / RESUME
    saved: tuple[dict[str, Tensor], dict[str, Any]] | None = None
    if resume:
        saved = load_train_state(state_path)
        old = TrainConfig.from_dict(saved[1]["config"])
        for key in ("method", "method_kwargs", "backbone", "backbone_kwargs", "preprocess"):
            if getattr(old, key) != getattr(config, key):
                raise UserError(f"cannot resume: {key} differs from the run in {run_dir}")
    elif state_path.exists():
        raise UserError(f"{run_dir} already holds a run: pass --resume to continue it, or "
                        "choose another --out")

    first = int(saved[1]["step"]) if saved is not None else 0
    yield Progress(first, config.episodes, message="loading data")
    data = prepare_data(config, device)
    if data.skipped:
        listed = "; ".join(f"{m} ({why})" for m, why in data.skipped[:10])
        more = f" and {len(data.skipped) - 10} more" if len(data.skipped) > 10 else ""
        warnings.warn(f"skipped {len(data.skipped)} unreadable files: {listed}{more}",
                      stacklevel=2)

    torch.manual_seed(config.seed)
    model, spec = build_model(config)
    model.to(device)
    opt = make_optimizer(model.parameters(), config.lr, config.weight_decay, device)
    step_module = distributed.wrap(model, info)
    if config.compile:
        step_module = compile_step(step_module, device)

    def make_sampler(seed: int) -> EpisodeSampler:
        """The training stream: random-class episodes, ``within_alphabet_fraction`` of them
        within one alphabet (support and query by different drawers)."""
        hard: dict[str, Any] = {}
        if config.within_alphabet_fraction > 0:
            hard = {**within_alphabet_args(data.train),
                    "group_fraction": config.within_alphabet_fraction}
        return EpisodeSampler(data.train.targets, config.way, config.shot, config.query,
                              seed=seed, class_names=data.train_classes, **hard)

    sampler = make_sampler(config.seed + info.rank)
    if config.val_within_alphabet and data.val is not None:  # a UserError now, not later
        fixed_episodes(data.val, config.val_way, config.val_shot, data.val_query, 1, 0, True)
    gen = torch.Generator(device=device)
    gen.manual_seed(config.seed + 7919 * (info.rank + 1))
    batches = BatchMaker(data.train.images, config.preprocess, config.augment, gen,
                         config.augment_strength)

    start = 0
    best_acc = -1.0
    best_val: EvalResult | None = None
    elapsed_before = 0.0
    if saved is not None:
        tensors, meta = saved
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        _optimizer_from_flat(opt, tensors, meta["optimizer"])
        start = int(meta["step"])
        best_acc = float(meta.get("best_acc", -1.0))
        if meta.get("best_val"):
            b = meta["best_val"]
            best_val = EvalResult(b["accuracy"], b["ci95"], b["episodes"], [], b["way"],
                                  b["shot"], b["query"], b["seed"])
        elapsed_before = float(meta.get("elapsed_s", 0.0))
        samplers = meta.get("sampler_states", [])
        rng = tensors.get(f"rng.{info.rank}")
        if (info.rank < len(samplers) and samplers[info.rank] is not None
                and rng is not None and len(samplers) == info.world_size):
            sampler.load_state_dict(samplers[info.rank])
            gen.set_state(rng)
        else:  # no saved stream for this rank: a fresh one, distinct from the first run's
            fresh = config.seed + info.rank + 1_000_003 * start
            sampler = make_sampler(fresh)
            gen.manual_seed(fresh + 7919)
        if "rng.torch" in tensors:
            torch.set_rng_state(tensors["rng.torch"])

    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        log = _MetricsLog(run_dir / METRICS, start if resume else None)
    val_sampler_seed = config.seed + 1
    hw = hardware_name(device)
    t0 = time.perf_counter()
    amp = config.amp and device.type == "cuda"
    ckpt_dtype = torch.float16 if config.fp16_checkpoints else None

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - t0

    def checkpoint(step: int, val: EvalResult | None) -> Checkpoint:
        training = {
            "config": config.to_dict(), "step": step, "world_size": info.world_size,
            "hardware": hw, "wall_time_s": round(elapsed(), 1),
            "train_classes": len(data.train_classes), "val_classes": len(data.val_classes),
            "skipped_files": len(data.skipped),
        }
        evaluation = {}
        if val is not None:
            evaluation[validation_key(config)] = val.to_dict()
        return Checkpoint(model=spec, preprocess=config.preprocess,
                          state_dict={k: v.detach().cpu() for k, v in model.state_dict().items()},
                          name=config.name or run_dir.name, description=config.description,
                          training=training, evaluation=evaluation)

    def save_all(step: int, val: EvalResult | None) -> None:
        """Write last (+ best when ``val`` is a new best) and the resume state.

        Collective under DDP (every rank sends its RNG state); only rank 0 writes."""
        sampler_states = distributed.gather_json(sampler.state_dict(), info)
        rng_states = distributed.all_gather_tensor(gen.get_state(), info)
        if not info.is_main:
            return
        ckpt = checkpoint(step, val if val is not None else best_val)
        save_checkpoint(run_dir / LAST, ckpt, dtype=ckpt_dtype)
        if val is not None and val.accuracy > best_acc_box[0]:
            best_acc_box[0] = val.accuracy
            save_checkpoint(run_dir / BEST, ckpt, dtype=ckpt_dtype)
        elif not config.has_validation:
            save_checkpoint(run_dir / BEST, ckpt, dtype=ckpt_dtype)
        save_train_state(state_path, model, opt, {
            "step": step, "config": config.to_dict(), "best_acc": best_acc_box[0],
            "elapsed_s": elapsed(), "sampler_states": sampler_states,
            "best_val": best_val.to_dict() if best_val is not None else None,
            "world_size": info.world_size,
        }, rng_states)

    best_acc_box = [best_acc]
    done = start
    saved_step = start if resume else -1
    loss_sum = torch.zeros((), device=device)
    acc_sum = torch.zeros((), device=device)
    n_sum = 0
    metrics: dict[str, float] = {}
    model.train()
    try:
        for step in range(start, config.episodes):
            lr = lr_at(config, step, elapsed() / config.time_limit_s
                       if config.fit_schedule and config.time_limit_s else 0.0)
            for g in opt.param_groups:
                g["lr"] = lr
            loss, acc = train_step(step_module, opt,
                                   batches(sampler.sample_batch(config.meta_batch)),
                                   amp=amp, grad_clip=config.grad_clip, n_way=config.way)
            done = step + 1
            loss_sum += loss.detach().float()
            acc_sum += acc.detach().float()
            n_sum += 1

            last = done == config.episodes
            if done % config.log_every == 0 or last:
                metrics = {"loss": float(loss_sum.item()) / n_sum,
                           "acc": float(acc_sum.item()) / n_sum, "lr": lr,
                           **({"val_acc": best_val.accuracy} if best_val else {})}
                if not math.isfinite(metrics["loss"]):
                    raise UserError(f"training diverged at step {done} (loss is "
                                    f"{metrics['loss']}); try a smaller --lr")
                if info.is_main:
                    log.write({"step": done, "lr": lr, "loss": metrics["loss"],
                               "acc": metrics["acc"], "elapsed_s": round(elapsed(), 2)})
                loss_sum.zero_()
                acc_sum.zero_()
                n_sum = 0
            out_of_time = config.time_limit_s is not None and elapsed() >= config.time_limit_s
            if done % config.log_every == 0 or last:
                out_of_time = distributed.any_across(out_of_time, info)
            else:
                out_of_time = out_of_time and not info.distributed
            validate = config.has_validation and data.val is not None and (
                done % config.val_every == 0 or last or out_of_time)
            if validate or last or out_of_time:
                val = None
                if validate and info.is_main:
                    val = evaluate(model, data.val, config.preprocess, config.val_way,
                                   config.val_shot, data.val_query, config.val_episodes,
                                   seed=val_sampler_seed, device=device,
                                   within_alphabet=config.val_within_alphabet)
                    model.train()
                    if best_val is None or val.accuracy > best_val.accuracy:
                        best_val = val
                    metrics = {**metrics, "val_acc": val.accuracy}
                    log.write({"step": done, "lr": lr, "val_acc": val.accuracy,
                               "val_ci95": val.ci95, "elapsed_s": round(elapsed(), 2)})
                save_all(done, val)
                saved_step = done
            msg = f"val {100 * best_val.accuracy:.2f}% best" if best_val else ""
            yield Progress(done, config.episodes, message=msg, metrics=dict(metrics))
            if out_of_time:
                break
    except (GeneratorExit, KeyboardInterrupt):
        if done != saved_step and done > 0 and info.is_main:
            # Cancelled or interrupted: leave a resumable checkpoint (rank 0 alone; no
            # collectives, the other ranks may be gone).
            solo = distributed.DistInfo(device=device)
            sampler_states = [sampler.state_dict()]
            if info.distributed:
                sampler_states = [None] * info.world_size
                sampler_states[0] = sampler.state_dict()
            save_checkpoint(run_dir / LAST, checkpoint(done, best_val), dtype=ckpt_dtype)
            save_train_state(state_path, model, opt, {
                "step": done, "config": config.to_dict(), "best_acc": best_acc_box[0],
                "elapsed_s": elapsed(), "sampler_states": sampler_states,
            "best_val": best_val.to_dict() if best_val is not None else None,
                "world_size": info.world_size,
            }, distributed.all_gather_tensor(gen.get_state(), solo))
            if not (run_dir / BEST).exists():
                save_checkpoint(run_dir / BEST, checkpoint(done, best_val), dtype=ckpt_dtype)
        raise
    yield Progress(done, config.episodes, message="done", metrics=dict(metrics),
                   payload=TrainResult(run_dir, done, run_dir / BEST if info.is_main else None,
                                       run_dir / LAST if info.is_main else None, best_val,
                                       data.skipped, model, done < config.episodes))
