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

The loop lives here (:class:`_Run`, one method per stage of a step); data preparation in
:mod:`.train_data`, the model / schedule / batch / step pieces in :mod:`.steps` and the resume
state (:class:`~.train_state.RunState`) in :mod:`.train_state` (all importable from here too).
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
from fewshot_studio.training.train_data import TrainData, prepare_data
from fewshot_studio.training.train_state import (
    RunState,
    load_train_state,
    model_state,
    optimizer_from_flat,
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
        # every rank done (rank 0 has written the checkpoints) before any leaves the group: a
        # rank that tears down while another still talks to it can abort both (gloo)
        distributed.barrier(info)
    finally:
        distributed.teardown(info)


def _load_resume(config: TrainConfig, resume: bool, run_dir: Path
                 ) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
    """The saved state to continue from (``resume``), else None; UserError when resuming a
    different model, or when a fresh run would overwrite one."""
    state_path = run_dir / RESUME
    if not resume:
        if state_path.exists():
            raise UserError(f"{run_dir} already holds a run: pass --resume to continue it, "
                            "or choose another --out")
        return None
    saved = load_train_state(state_path)
    old = TrainConfig.from_dict(saved[1]["config"])
    for key in ("method", "method_kwargs", "backbone", "backbone_kwargs", "preprocess"):
        if getattr(old, key) != getattr(config, key):
            raise UserError(f"cannot resume: {key} differs from the run in {run_dir}")
    return saved


def _prepare(config: TrainConfig, device: torch.device) -> TrainData:
    """The training data on ``device``, warning about the files that could not be read."""
    data = prepare_data(config, device)
    if data.skipped:
        listed = "; ".join(f"{m} ({why})" for m, why in data.skipped[:10])
        more = f" and {len(data.skipped) - 10} more" if len(data.skipped) > 10 else ""
        warnings.warn(f"skipped {len(data.skipped)} unreadable files: {listed}{more}",
                      stacklevel=3)
    return data


def _train(config: TrainConfig, resume: bool, info: distributed.DistInfo
           ) -> Iterator[Progress]:
    if info.device.type == "cuda":  # fixed episode shapes: let cuDNN pick its fastest kernels
        torch.backends.cudnn.benchmark = True
    run_dir = Path(config.out).expanduser()
    saved = _load_resume(config, resume, run_dir)
    first = int(saved[1]["step"]) if saved is not None else 0
    yield Progress(first, config.episodes, message="loading data")
    run = _Run(config, info, _prepare(config, info.device), run_dir)
    if saved is not None:
        run.restore(*saved)
    run.start(resume)
    yield from run.loop()


class _Run:
    """One training process: the model, optimiser, episode stream and :class:`RunState`, and
    the stages of a step (schedule, log, validate, save) as methods."""

    def __init__(self, config: TrainConfig, info: distributed.DistInfo, data: TrainData,
                 run_dir: Path) -> None:
        self.config, self.info, self.data, self.run_dir = config, info, data, run_dir
        device = info.device
        torch.manual_seed(config.seed)
        self.model, self.spec = build_model(config)
        self.model.to(device)
        self.opt = make_optimizer(self.model.parameters(), config.lr, config.weight_decay,
                                  device)
        self.step_module = distributed.wrap(self.model, info)
        if config.compile:
            self.step_module = compile_step(self.step_module, device)
        self.sampler = self._sampler(config.seed + info.rank)
        if config.val_within_alphabet and data.val is not None:  # a UserError now, not later
            fixed_episodes(data.val, config.val_way, config.val_shot, data.val_query, 1, 0,
                           True)
        self.gen = torch.Generator(device=device)
        self.gen.manual_seed(config.seed + 7919 * (info.rank + 1))
        self.batches = BatchMaker(data.train.images, config.preprocess, config.augment,
                                  self.gen, config.augment_strength)
        self.state = RunState()
        self.saved_step = -1  # the step of the last checkpoint written
        self.log: _MetricsLog | None = None  # rank 0's metrics.csv, from start()
        self.hardware = hardware_name(device)
        self.t0 = time.perf_counter()  # restarted by start()
        self.metrics: dict[str, float] = {}
        self.ckpt_dtype = torch.float16 if config.fp16_checkpoints else None
        self.amp = config.amp and device.type == "cuda"

    def _sampler(self, seed: int) -> EpisodeSampler:
        """The training stream: random-class episodes, ``within_alphabet_fraction`` of them
        within one alphabet (support and query by different drawers)."""
        config, data = self.config, self.data
        hard: dict[str, Any] = {}
        if config.within_alphabet_fraction > 0:
            hard = {**within_alphabet_args(data.train),
                    "group_fraction": config.within_alphabet_fraction}
        return EpisodeSampler(data.train.targets, config.way, config.shot, config.query,
                              seed=seed, class_names=data.train_classes, **hard)

    def restore(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        """Continue from a saved state: weights, optimiser, :class:`RunState`, this rank's
        episode stream and augmentation RNG (a fresh, distinct stream if none was saved for
        it), the global torch RNG."""
        rank = self.info.rank
        self.model.load_state_dict(model_state(tensors))
        optimizer_from_flat(self.opt, tensors, meta["optimizer"])
        self.state = RunState.from_saved(meta)
        self.saved_step = self.state.step
        samplers = meta.get("sampler_states", [])
        rng = tensors.get(f"rng.{rank}")
        if (rank < len(samplers) and samplers[rank] is not None
                and rng is not None and len(samplers) == self.info.world_size):
            self.sampler.load_state_dict(samplers[rank])
            self.gen.set_state(rng)
        else:  # no saved stream for this rank: a fresh one, distinct from the first run's
            fresh = self.config.seed + rank + 1_000_003 * self.state.step
            self.sampler = self._sampler(fresh)
            self.gen.manual_seed(fresh + 7919)
        if "rng.torch" in tensors:
            torch.set_rng_state(tensors["rng.torch"])

    def start(self, resume: bool) -> None:
        """Open the run directory and its metrics log (rank 0) and start the clock."""
        if self.info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.log = _MetricsLog(self.run_dir / METRICS,
                                   self.state.step if resume else None)
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        return self.state.elapsed_before + time.perf_counter() - self.t0

    # -- checkpoints -------------------------------------------------------------------------
    def checkpoint(self, val: EvalResult | None) -> Checkpoint:
        """The model at ``state.step`` with its training metadata and ``val`` (if any)."""
        config, data = self.config, self.data
        training = {
            "config": config.to_dict(), "step": self.state.step,
            "world_size": self.info.world_size, "hardware": self.hardware,
            "wall_time_s": round(self.elapsed(), 1),
            "train_classes": len(data.train_classes), "val_classes": len(data.val_classes),
            "skipped_files": len(data.skipped),
        }
        evaluation = {}
        if val is not None:
            evaluation[validation_key(config)] = val.to_dict()
        state_dict = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        return Checkpoint(model=self.spec, preprocess=config.preprocess, state_dict=state_dict,
                          name=config.name or self.run_dir.name,
                          description=config.description, training=training,
                          evaluation=evaluation)

    def _save_state(self, sampler_states: list[Any], rng_states: list[Tensor]) -> None:
        self.state.save(self.run_dir / RESUME, self.model, self.opt,
                        config=self.config.to_dict(), elapsed_s=self.elapsed(),
                        sampler_states=sampler_states, world_size=self.info.world_size,
                        rng_states=rng_states)

    def save_all(self, val: EvalResult | None) -> None:
        """Write last (+ best when ``val`` is a new best) and the resume state.

        Collective under DDP (every rank sends its RNG state); only rank 0 writes."""
        info = self.info
        sampler_states = distributed.gather_json(self.sampler.state_dict(), info)
        rng_states = distributed.all_gather_tensor(self.gen.get_state(), info)
        if not info.is_main:
            return
        ckpt = self.checkpoint(val if val is not None else self.state.best_val)
        save_checkpoint(self.run_dir / LAST, ckpt, dtype=self.ckpt_dtype)
        if val is not None and val.accuracy > self.state.best_acc:
            self.state.best_acc = val.accuracy
            save_checkpoint(self.run_dir / BEST, ckpt, dtype=self.ckpt_dtype)
        elif not self.config.has_validation:
            save_checkpoint(self.run_dir / BEST, ckpt, dtype=self.ckpt_dtype)
        self._save_state(sampler_states, rng_states)

    def save_interrupted(self) -> None:
        """Cancelled or interrupted: leave a resumable checkpoint (rank 0 alone; no
        collectives, the other ranks may be gone)."""
        if self.state.step == self.saved_step or self.state.step == 0 or not self.info.is_main:
            return
        sampler_states: list[Any] = [self.sampler.state_dict()]
        if self.info.distributed:
            sampler_states = [None] * self.info.world_size
            sampler_states[0] = self.sampler.state_dict()
        save_checkpoint(self.run_dir / LAST, self.checkpoint(self.state.best_val),
                        dtype=self.ckpt_dtype)
        solo = distributed.DistInfo(device=self.info.device)
        self._save_state(sampler_states,
                         distributed.all_gather_tensor(self.gen.get_state(), solo))
        if not (self.run_dir / BEST).exists():
            save_checkpoint(self.run_dir / BEST, self.checkpoint(self.state.best_val),
                            dtype=self.ckpt_dtype)

    # -- the stages of a step ----------------------------------------------------------------
    def optimise(self, step: int) -> tuple[float, Tensor, Tensor]:
        """Set the schedule's learning rate for ``step`` and take one optimiser step on a
        sampled task batch; ``(lr, loss, accuracy)``."""
        config = self.config
        fraction = (self.elapsed() / config.time_limit_s
                    if config.fit_schedule and config.time_limit_s else 0.0)
        lr = lr_at(config, step, fraction)
        for g in self.opt.param_groups:
            g["lr"] = lr
        batch = self.batches(self.sampler.sample_batch(config.meta_batch))
        loss, acc = train_step(self.step_module, self.opt, batch, amp=self.amp,
                               grad_clip=config.grad_clip, n_way=config.way)
        self.state.step = step + 1
        return lr, loss, acc

    def log_point(self, lr: float, loss_sum: Tensor, acc_sum: Tensor, n: int) -> None:
        """The running means since the last log point into ``metrics`` (and metrics.csv);
        UserError when the loss diverged."""
        done, best_val = self.state.step, self.state.best_val
        self.metrics = {"loss": float(loss_sum.item()) / n, "acc": float(acc_sum.item()) / n,
                        "lr": lr, **({"val_acc": best_val.accuracy} if best_val else {})}
        if not math.isfinite(self.metrics["loss"]):
            raise UserError(f"training diverged at step {done} (loss is "
                            f"{self.metrics['loss']}); try a smaller --lr")
        if self.log is not None:
            self.log.write({"step": done, "lr": lr, "loss": self.metrics["loss"],
                            "acc": self.metrics["acc"], "elapsed_s": round(self.elapsed(), 2)})

    def out_of_time(self, at_log_point: bool) -> bool:
        """Whether the time limit is reached: agreed across ranks at log points; between
        them only a single process stops."""
        limit = self.config.time_limit_s
        out = limit is not None and self.elapsed() >= limit
        if at_log_point:
            return distributed.any_across(out, self.info)
        return out and not self.info.distributed

    def validate(self, lr: float) -> EvalResult | None:
        """Accuracy on the fixed validation episodes (rank 0; None elsewhere), logged and
        kept as ``best_val`` when it is the best so far."""
        if not self.info.is_main:
            return None
        config, data = self.config, self.data
        val = evaluate(self.model, data.val, config.preprocess, config.val_way,
                       config.val_shot, data.val_query, config.val_episodes,
                       seed=config.seed + 1, device=self.info.device,
                       within_alphabet=config.val_within_alphabet)
        self.model.train()
        if self.state.best_val is None or val.accuracy > self.state.best_val.accuracy:
            self.state.best_val = val
        self.metrics = {**self.metrics, "val_acc": val.accuracy}
        if self.log is not None:
            self.log.write({"step": self.state.step, "lr": lr, "val_acc": val.accuracy,
                            "val_ci95": val.ci95, "elapsed_s": round(self.elapsed(), 2)})
        return val

    def loop(self) -> Iterator[Progress]:
        """Train from ``state.step`` to ``config.episodes`` (or the time limit), yielding a
        :class:`Progress` per step and finally the :class:`TrainResult`."""
        config, device = self.config, self.info.device
        loss_sum = torch.zeros((), device=device)
        acc_sum = torch.zeros((), device=device)
        n_sum = 0
        self.model.train()
        try:
            for step in range(self.state.step, config.episodes):
                lr, loss, acc = self.optimise(step)
                done = self.state.step
                loss_sum += loss.detach().float()
                acc_sum += acc.detach().float()
                n_sum += 1
                last = done == config.episodes
                at_log_point = done % config.log_every == 0 or last
                if at_log_point:
                    self.log_point(lr, loss_sum, acc_sum, n_sum)
                    loss_sum.zero_()
                    acc_sum.zero_()
                    n_sum = 0
                out_of_time = self.out_of_time(at_log_point)
                validate = config.has_validation and self.data.val is not None and (
                    done % config.val_every == 0 or last or out_of_time)
                if validate or last or out_of_time:
                    self.save_all(self.validate(lr) if validate else None)
                    self.saved_step = done
                best = self.state.best_val
                msg = f"val {100 * best.accuracy:.2f}% best" if best else ""
                yield Progress(done, config.episodes, message=msg, metrics=dict(self.metrics))
                if out_of_time:
                    break
        except (GeneratorExit, KeyboardInterrupt):
            self.save_interrupted()
            raise
        yield Progress(self.state.step, config.episodes, message="done",
                       metrics=dict(self.metrics), payload=self.result())

    def result(self) -> TrainResult:
        main, done = self.info.is_main, self.state.step
        return TrainResult(self.run_dir, done, self.run_dir / BEST if main else None,
                           self.run_dir / LAST if main else None, self.state.best_val,
                           self.data.skipped, self.model, done < self.config.episodes)
