"""The pieces of one training step: the model of a config, the learning-rate schedule,
episode batches on the device (:class:`BatchMaker`) and the optimiser step itself."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fewshot_studio.data.preprocess import Preprocess
from fewshot_studio.data.sampler import stack_episodes
from fewshot_studio.errors import UserError
from fewshot_studio.models import FewShotClassifier, create_model, model_spec
from fewshot_studio.training.config import TrainConfig


def build_model(config: TrainConfig) -> tuple[FewShotClassifier, dict[str, Any]]:
    """The model of ``config`` and its spec (for :func:`fewshot_studio.models.build_model`)."""
    pre = config.preprocess
    bkw = {"in_channels": pre.channels, "image_size": pre.image_size, **config.backbone_kwargs}
    try:
        model = create_model(config.method, config.backbone, config.method_kwargs, bkw)
    except KeyError as e:
        raise UserError(str(e).strip("'\"")) from None
    except (TypeError, ValueError) as e:
        raise UserError(f"cannot build {config.method} on {config.backbone}: {e}") from None
    config_fn = getattr(model.backbone, "config", None)
    bcfg = config_fn() if callable(config_fn) else bkw
    return model, model_spec(model, config.backbone, bcfg)


def lr_at(config: TrainConfig, step: int, time_fraction: float = 0.0) -> float:
    """Learning rate for optimiser step ``step`` (0-based). ``time_fraction``: the share of
    the time limit used so far; with ``config.fit_schedule`` the cosine schedule follows
    whichever of steps and time is further along."""
    if config.warmup and step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    if config.schedule == "step":
        return config.lr * config.gamma ** (step // max(1, config.step_size))
    if config.schedule == "cosine":
        span = max(1, config.episodes - config.warmup)
        t = min(1.0, (step - config.warmup) / span)
        if config.fit_schedule:
            t = min(1.0, max(t, time_fraction))
        floor = config.lr * config.min_lr_ratio
        return floor + (config.lr - floor) * 0.5 * (1 + math.cos(math.pi * t))
    return config.lr


def make_optimizer(params: Any, lr: float, weight_decay: float = 0.0,
                   device: torch.device | None = None) -> torch.optim.Optimizer:
    """Adam; on CUDA the fused implementation (one kernel launch for every parameter
    instead of a few per tensor: small models are launch-bound there)."""
    fused = device is not None and device.type == "cuda"
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay,
                            **({"fused": True} if fused else {}))


def compile_step(step_module: nn.Module, device: torch.device) -> nn.Module:
    """``step_module`` under ``torch.compile``: on CUDA ``mode="reduce-overhead"`` (the step
    replays as CUDA graphs, without a kernel launch per operation from Python); elsewhere the
    default mode."""
    mode = "reduce-overhead" if device.type == "cuda" else "default"
    return torch.compile(step_module, mode=mode)  # type: ignore[return-value]


def _mean_std(pre: Preprocess, device: torch.device) -> tuple[Tensor, Tensor]:
    """``(1, C, 1, 1)`` mean and std of ``pre`` on ``device``."""
    c = pre.channels
    mean = torch.tensor(pre.mean, dtype=torch.float32).expand(c).reshape(1, c, 1, 1)
    std = torch.tensor(pre.std, dtype=torch.float32).expand(c).reshape(1, c, 1, 1)
    return mean.to(device), std.to(device)


class BatchMaker:
    """Turns sampled episodes into normalised (and augmented) image batches on the device.

    On CUDA the episode's indices and labels travel in one pinned-memory copy
    (``pinned=True``): a copy from pageable memory waits for the GPU to finish all queued work
    first, so the next step could not be queued while this one runs."""

    def __init__(self, images: Tensor, pre: Preprocess, augment: str,
                 generator: torch.Generator, strength: float = 1.0,
                 pinned: bool = True) -> None:
        self.images = images  # (N, C, H, W) uint8 on the device
        self.pre = pre
        self.augment = augment
        self.strength = strength
        self.generator = generator
        self.device = images.device
        self.pinned = pinned and images.device.type == "cuda"
        self.mean, self.std = _mean_std(pre, images.device)

    def _images(self, idx: Tensor) -> Tensor:
        """``(T, n)`` indices on the device -> ``(T, n, C, H, W)`` float images."""
        t, n = idx.shape
        x = self.images[idx.reshape(-1)].float().div_(255.0)
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
        n_s, n = b.support.shape[1], b.support.shape[1] + b.query.shape[1]
        host = torch.cat([b.support, b.query, b.support_labels, b.query_labels], dim=1)
        if self.pinned:  # (T, 2n) int64: one asynchronous copy
            host = host.pin_memory()
        dev = host.to(self.device, non_blocking=True)
        x = self._images(dev[:, :n])
        return x[:, :n_s], dev[:, n:n + n_s], x[:, n_s:], dev[:, n + n_s:]


def train_step(step_module: nn.Module, opt: torch.optim.Optimizer,
               batch: tuple[Tensor, Tensor, Tensor, Tensor], amp: bool = False,
               grad_clip: float | None = None, n_way: int | None = None
               ) -> tuple[Tensor, Tensor]:
    """One optimiser step on a task batch (see :class:`BatchMaker`); ``step_module`` maps it
    to ``(loss, accuracy)`` (:func:`distributed.wrap`). Returns them, not synchronised.
    ``n_way``: the batch's classes per task, passed on to ``step_module`` when given (saves
    the model inferring it from the labels, a device sync per step)."""
    device_type = batch[0].device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=amp):
        loss, acc = step_module(*batch) if n_way is None else step_module(*batch, n_way=n_way)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        nn.utils.clip_grad_norm_(
            [p for g in opt.param_groups for p in g["params"]], grad_clip)
    opt.step()
    return loss, acc

