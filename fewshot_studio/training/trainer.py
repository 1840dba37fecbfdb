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
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from fewshot_studio.data.preprocess import Preprocess
from fewshot_studio.data.sampler import EpisodeSampler, stack_episodes
from fewshot_studio.errors import UserError
from fewshot_studio.io.checkpoint import Checkpoint, save_checkpoint
from fewshot_studio.models import FewShotClassifier, create_backbone, create_method, model_spec
from fewshot_studio.progress import Progress
from fewshot_studio.training import distributed
from fewshot_studio.training.config import TrainConfig
from fewshot_studio.training.evaluate import EvalResult, default_query, evaluate

BEST = "best.safetensors"
LAST = "last.safetensors"
RESUME = "resume.safetensors"
METRICS = "metrics.csv"
STATE_FORMAT = "fewshot-studio-train-state/1"
METRIC_FIELDS = ("step", "lr", "loss", "acc", "val_acc", "val_ci95", "elapsed_s")


# ----------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------
@dataclass
class TrainData:
    """Preloaded training and validation images (uint8 on the device) and what was skipped."""

    train: Any  # InMemoryImages
    val: Any | None
    skipped: list[tuple[str, str]] = field(default_factory=list)
    train_classes: list[str] = field(default_factory=list)
    val_classes: list[str] = field(default_factory=list)
    val_query: int = 15


def rotation_name(base: str, rotation: int) -> str:
    """The class name of ``base`` rotated by ``rotation`` degrees (``"<base>/rot090"``)."""
    return f"{base}/rot{rotation:03d}"


def _split_rotation(name: str) -> tuple[str, int | None]:
    """``"Alpha/char01/rot090"`` -> ``("Alpha/char01", 90)``; no suffix -> ``(name, None)``."""
    head, _, tail = name.rpartition("/")
    if head and len(tail) == 6 and tail.startswith("rot") and tail[3:].isdigit():
        return head, int(tail[3:])
    return name, None


def _read_class_list(path: str | Path) -> list[str]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"class list not found: {p}")
    lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


def _split_file(name: str, splits_dir: str | None) -> list[str]:
    """Lines of a named split (``vinyals_train`` ...) from ``splits_dir`` (default: the data
    module's location, ``$FEWSHOT_DATA`` or ``<repo>/../shared/data``)."""
    from fewshot_studio.data.datasets import load_split

    return list(load_split(name, splits_dir))


def _selection(lines: Sequence[str], default_rotations: Sequence[int]
               ) -> dict[str, tuple[int, ...]]:
    """Class-list lines (optionally with ``/rotNNN``) -> base class -> rotations."""
    sel: dict[str, set[int]] = {}
    for line in lines:
        base, rot = _split_rotation(line)
        sel.setdefault(base, set()).update([rot] if rot is not None else default_rotations)
    return {k: tuple(sorted(v)) for k, v in sel.items()}


def _open_datasets(paths: Sequence[str]) -> list[Any]:
    from fewshot_studio.data.datasets import ClassFolderDataset

    out = []
    for p in paths:
        path = Path(p).expanduser()
        if not path.exists():
            raise UserError(f"data not found: {path}")
        ds = ClassFolderDataset(path)
        if not ds.class_names:
            raise UserError(f"no class folders with images in {path}")
        out.append(ds)
    return out


def choose_split(config: TrainConfig, base_classes: Sequence[str]
                 ) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """Train and validation classes (base name -> rotations) for ``config.split``."""
    rots = config.rotations
    names = sorted(base_classes)
    known = set(names)

    def check(sel: dict[str, tuple[int, ...]], what: str) -> None:
        missing = sorted(set(sel) - known)
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise UserError(f"{len(missing)} classes of the {what} are not in the data: "
                            f"{', '.join(missing[:5])}{more}")

    if config.split in ("vinyals", "vinyals-trainval"):
        train_name = "vinyals_train" if config.split == "vinyals" else "vinyals_trainval"
        train = _selection(_split_file(train_name, config.splits_dir), rots)
        val = _selection(_split_file("vinyals_val", config.splits_dir), (0,))
        check(train, f"{train_name} split (pass every dataset it names, e.g. both Omniglot "
                     "zips)")
        check(val, "vinyals_val split")
        return train, val
    if config.split == "files":
        val = _selection(_read_class_list(config.val_classes or ""), (0,))
        check(val, f"validation class list {config.val_classes}")
        if config.train_classes:
            train = _selection(_read_class_list(config.train_classes), rots)
            check(train, f"training class list {config.train_classes}")
        else:
            train = {n: tuple(rots) for n in names if n not in val}
        overlap = sorted(set(train) & set(val))
        if overlap:
            raise UserError(f"classes in both the training and validation lists: "
                            f"{', '.join(overlap[:5])}")
        return train, val
    if config.split == "none":
        return {n: tuple(rots) for n in names}, {}

    rng = np.random.default_rng(config.seed)
    n_val = max(config.val_way, round(config.val_fraction * len(names)))
    if config.split == "groups":
        groups: dict[str, list[str]] = {}
        for n in names:
            groups.setdefault(n.rpartition("/")[0] or n, []).append(n)
        keys = sorted(groups)
        if len(keys) < 2:
            raise UserError("split 'groups' needs classes in at least two top-level folders")
        val_names: list[str] = []
        for i in rng.permutation(len(keys)):
            if len(val_names) >= n_val:
                break
            val_names.extend(groups[keys[int(i)]])
    else:
        val_names = [names[int(i)] for i in rng.permutation(len(names))[:n_val]]
    val_set = set(val_names)
    train = {n: tuple(rots) for n in names if n not in val_set}
    need_train = math.ceil(config.way / max(1, len(rots)))
    if len(train) < need_train:
        raise UserError(
            f"the data has {len(names)} classes: too few for {config.way}-way training on "
            f"{need_train} classes plus {len(val_set)} classes held out for "
            f"{config.val_way}-way validation (use --split none, a smaller --way, or more "
            "classes)")
    return train, {n: (0,) for n in sorted(val_set)}


def _check_counts(sel: dict[str, tuple[int, ...]], counts: dict[str, int],
                  where: dict[str, str], way: int, need: int, what: str) -> None:
    n_classes = sum(len(r) for r in sel.values())
    if n_classes < way:
        raise UserError(f"{way}-way {what} needs at least {way} classes, but there are "
                        f"{n_classes}")
    short = sorted(n for n in sel if counts.get(n, 0) < need)
    if short:
        desc = ", ".join(f"{n!r} in {where.get(n, '?')} ({counts.get(n, 0)} images)"
                         for n in short[:5])
        more = f" and {len(short) - 5} more" if len(short) > 5 else ""
        raise UserError(f"class {desc}{more}: fewer than the {need} images (shot + query) "
                        f"that {what} episodes need")


def merge_images(parts: Sequence[Any]) -> Any:
    """Concatenate InMemoryImages, merging classes of the same name."""
    from fewshot_studio.data.datasets import InMemoryImages

    if len(parts) == 1:
        return parts[0]
    names: list[str] = []
    index: dict[str, int] = {}
    images, targets, skipped = [], [], []
    for p in parts:
        mapping = torch.tensor([index.setdefault(n, len(index)) for n in p.class_names],
                               dtype=torch.long)
        for n in p.class_names:
            if n not in names:
                names.append(n)
        images.append(p.images)
        targets.append(mapping.to(p.targets.device)[p.targets])
        skipped.extend(p.skipped)
    return InMemoryImages(images=torch.cat(images), targets=torch.cat(targets),
                          class_names=names, skipped=skipped)


def _preload(datasets: Sequence[Any], sel: dict[str, tuple[int, ...]], pre: Preprocess,
             size: int | None, device: torch.device) -> Any:
    from fewshot_studio.data.datasets import preload

    parts = []
    for ds in datasets:
        mine = [n for n in ds.class_names if n in sel]
        if not mine:
            continue
        rots = sorted({r for n in mine for r in sel[n]})
        sub = ds.select(mine)
        imgs = preload(sub, pre, rotations=rots, size=size)
        wanted = [rotation_name(n, r) if rots != [0] else n for n in mine for r in sel[n]]
        if rots != [0]:
            wanted = [_loaded_name(imgs.class_names, w) for w in wanted]
        if wanted != list(imgs.class_names):
            imgs = imgs.subset_classes(wanted)
        parts.append(imgs)
    return merge_images(parts).to(device)


def _loaded_name(loaded: Sequence[str], wanted: str) -> str:
    """The name preload gave a rotated class (rotation 0 may carry no suffix)."""
    if wanted in loaded:
        return wanted
    base, rot = _split_rotation(wanted)
    if rot == 0 and base in loaded:
        return base
    return wanted


def prepare_data(config: TrainConfig, device: torch.device) -> TrainData:
    """Open the datasets, choose the split, check counts (UserError before any loading) and
    preload train / validation images as uint8 onto ``device``."""
    datasets = _open_datasets(config.data)
    counts: dict[str, int] = {}
    where: dict[str, str] = {}
    for ds in datasets:
        per_class = np.bincount(np.asarray(ds.targets), minlength=len(ds.class_names))
        for i, n in enumerate(ds.class_names):
            counts[n] = counts.get(n, 0) + int(per_class[i])
            where.setdefault(n, str(ds.root))
    train_sel, val_sel = choose_split(config, list(counts))
    _check_counts(train_sel, counts, where, config.way, config.shot + config.query, "training")
    val_query = config.val_query
    if config.has_validation and val_sel:
        if val_query is None:
            val_query = default_query(config.val_shot, min(counts[n] for n in val_sel))
        _check_counts(val_sel, counts, where, config.val_way, config.val_shot + val_query,
                      "validation")
    train = _preload(datasets, train_sel, config.preprocess, None, device)
    val = None
    if config.has_validation and val_sel:
        val = _preload(datasets, val_sel, config.preprocess, None, device)
    skipped = list(train.skipped) + (list(val.skipped) if val is not None else [])
    return TrainData(train, val, skipped, list(train.class_names),
                     list(val.class_names) if val is not None else [], val_query or 1)


# ----------------------------------------------------------------------------------------
# model, schedule, batches
# ----------------------------------------------------------------------------------------
def build_model(config: TrainConfig) -> tuple[FewShotClassifier, dict[str, Any]]:
    """The model of ``config`` and its spec (for :func:`fewshot_studio.models.build_model`)."""
    pre = config.preprocess
    bkw = {"in_channels": pre.channels, "image_size": pre.image_size, **config.backbone_kwargs}
    try:
        backbone = create_backbone(config.backbone, **bkw)
        model = create_method(config.method, backbone, **config.method_kwargs)
    except KeyError as e:
        raise UserError(str(e).strip("'\"")) from None
    except (TypeError, ValueError) as e:
        raise UserError(f"cannot build {config.method} on {config.backbone}: {e}") from None
    config_fn = getattr(backbone, "config", None)
    bcfg = config_fn() if callable(config_fn) else bkw
    return model, model_spec(model, config.backbone, bcfg)


def lr_at(config: TrainConfig, step: int) -> float:
    """Learning rate for optimiser step ``step`` (0-based)."""
    if config.warmup and step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    if config.schedule == "step":
        return config.lr * config.gamma ** (step // max(1, config.step_size))
    if config.schedule == "cosine":
        span = max(1, config.episodes - config.warmup)
        t = min(1.0, (step - config.warmup) / span)
        floor = config.lr * config.min_lr_ratio
        return floor + (config.lr - floor) * 0.5 * (1 + math.cos(math.pi * t))
    return config.lr


def _mean_std(pre: Preprocess, device: torch.device) -> tuple[Tensor, Tensor]:
    """``(1, C, 1, 1)`` mean and std of ``pre`` on ``device``."""
    c = pre.channels
    mean = torch.tensor(pre.mean, dtype=torch.float32).expand(c).reshape(1, c, 1, 1)
    std = torch.tensor(pre.std, dtype=torch.float32).expand(c).reshape(1, c, 1, 1)
    return mean.to(device), std.to(device)


class BatchMaker:
    """Turns sampled episodes into normalised (and augmented) image batches on the device."""

    def __init__(self, images: Tensor, pre: Preprocess, augment: str,
                 generator: torch.Generator, strength: float = 1.0) -> None:
        self.images = images  # (N, C, H, W) uint8 on the device
        self.pre = pre
        self.augment = augment
        self.strength = strength
        self.generator = generator
        self.device = images.device
        self.mean, self.std = _mean_std(pre, images.device)

    def _images(self, idx: Tensor) -> Tensor:
        """``(T, n)`` indices -> ``(T, n, C, H, W)`` float images."""
        t, n = idx.shape
        x = self.images[idx.reshape(-1).to(self.device, non_blocking=True)].float().div_(255.0)
        if self.augment == "omniglot":
            from fewshot_studio.data.augment import omniglot_augment

            x = omniglot_augment(x, self.generator, strength=self.strength)
        elif self.augment == "photo":
            from fewshot_studio.data.augment import photo_augment

            x = photo_augment(x, self.generator, self.pre.image_size, strength=self.strength)
        x = (x - self.mean) / self.std
        return x.reshape(t, n, *x.shape[1:])

    def __call__(self, episodes: Sequence[Any]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """T episodes -> ``(T, n_s, C, H, W)``, ``(T, n_s)``, ``(T, n_q, C, H, W)``,
        ``(T, n_q)``."""
        b = stack_episodes(episodes)
        n_s = b.support.shape[1]
        x = self._images(torch.cat([b.support, b.query], dim=1))
        return (x[:, :n_s], b.support_labels.to(self.device, non_blocking=True),
                x[:, n_s:], b.query_labels.to(self.device, non_blocking=True))


def train_step(step_module: nn.Module, opt: torch.optim.Optimizer,
               batch: tuple[Tensor, Tensor, Tensor, Tensor], amp: bool = False,
               grad_clip: float | None = None) -> tuple[Tensor, Tensor]:
    """One optimiser step on a task batch (see :class:`BatchMaker`); ``step_module`` maps it
    to ``(loss, accuracy)`` (:func:`distributed.wrap`). Returns them, not synchronised."""
    device_type = batch[0].device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=amp):
        loss, acc = step_module(*batch)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        nn.utils.clip_grad_norm_(
            [p for g in opt.param_groups for p in g["params"]], grad_clip)
    opt.step()
    return loss, acc


# ----------------------------------------------------------------------------------------
# train state (resume): safetensors tensors + JSON, never pickle
# ----------------------------------------------------------------------------------------
def _optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, Tensor):
                tensors[f"optim.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_flat(opt: torch.optim.Optimizer, tensors: dict[str, Tensor],
                         meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    for pid, sc in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(sc)
    groups = meta["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    opt.load_state_dict({"state": state, "param_groups": groups})


def save_train_state(path: Path, model: nn.Module, opt: torch.optim.Optimizer,
                     meta: dict[str, Any], rng_states: Sequence[Tensor]) -> None:
    """Write weights, optimiser state, RNG states and ``meta`` (JSON) atomically."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    opt_tensors, opt_meta = _optimizer_to_flat(opt)
    tensors.update(opt_tensors)
    for r, s in enumerate(rng_states):
        tensors[f"rng.{r}"] = s.cpu().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    header = {"format": STATE_FORMAT, "meta": json.dumps({**meta, "optimizer": opt_meta})}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=header)
    os.replace(tmp, path)


def load_train_state(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``(tensors, meta)`` of a train-state file; UserError when missing or damaged."""
    from safetensors import safe_open

    if not path.is_file():
        raise UserError(f"nothing to resume: {path} not found (start without --resume)")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        tensors = load_file(str(path))
        if header.get("format") != STATE_FORMAT:
            raise ValueError("not a training state file")
        meta = json.loads(header["meta"])
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot resume from {path}: {e}") from None
    return tensors, meta


# ----------------------------------------------------------------------------------------
# the training loop
# ----------------------------------------------------------------------------------------
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
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    step_module = distributed.wrap(model, info)

    sampler = EpisodeSampler(data.train.targets, config.way, config.shot, config.query,
                             seed=config.seed + info.rank, class_names=data.train_classes)
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
            sampler = EpisodeSampler(data.train.targets, config.way, config.shot,
                                     config.query, seed=fresh, class_names=data.train_classes)
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
            evaluation[f"validation {config.val_way}w{config.val_shot}s"] = val.to_dict()
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
            lr = lr_at(config, step)
            for g in opt.param_groups:
                g["lr"] = lr
            loss, acc = train_step(step_module, opt,
                                   batches(sampler.sample_batch(config.meta_batch)),
                                   amp=amp, grad_clip=config.grad_clip)
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
                                   seed=val_sampler_seed, device=device)
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


def load_eval_images(data: Sequence[str], pre: Preprocess, classes: str | None = None,
                     splits_dir: str | None = None,
                     device: str | torch.device = "cpu") -> Any:
    """Preload evaluation images (uint8 InMemoryImages on ``device``) from one or more
    datasets. ``classes``: None (every class), a file with one class per line, or a split
    name (``vinyals_test``, ``test`` ...); ``/rotNNN`` suffixes add rotated classes."""
    datasets = _open_datasets(data)
    names: dict[str, None] = {}
    for ds in datasets:
        names.update(dict.fromkeys(ds.class_names))
    if classes is None:
        sel = {n: (0,) for n in names}
    else:
        lines = (_read_class_list(classes) if Path(classes).expanduser().is_file()
                 else _split_file(classes, splits_dir))
        sel = _selection(lines, (0,))
        missing = sorted(set(sel) - set(names))
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise UserError(f"{len(missing)} classes of {classes} are not in the data: "
                            f"{', '.join(missing[:5])}{more}")
    images = _preload(datasets, sel, pre, None, torch.device(device))
    if images.skipped:
        listed = "; ".join(f"{m} ({why})" for m, why in images.skipped[:10])
        warnings.warn(f"skipped {len(images.skipped)} unreadable files: {listed}", stacklevel=2)
    return images
