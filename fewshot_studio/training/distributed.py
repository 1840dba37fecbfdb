"""Distributed data-parallel meta-training under ``torchrun``.

``torchrun --nproc_per_node N -m fewshot_studio train ...`` sets ``RANK`` / ``WORLD_SIZE`` /
``LOCAL_RANK``; :func:`setup` then joins the process group (gloo on CPU, nccl on CUDA) and the
trainer wraps its model in :class:`~torch.nn.parallel.DistributedDataParallel`. Each rank
samples its own episodes (seed + rank); gradients are averaged; only rank 0 writes
checkpoints and metrics.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

_CPU = torch.device("cpu")


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job. ``world_size == 1``: not distributed."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = _CPU
    initialized_here: bool = False  # this module created the process group (and destroys it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when not launched by torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def resolve_device(pref: str, local_rank: int = 0) -> torch.device:
    """``"auto"`` | ``"cpu"`` | ``"cuda"`` -> a device (``cuda:<local_rank>`` under torchrun)."""
    from fewshot_studio.errors import UserError

    if pref == "cpu":
        return torch.device("cpu")
    if pref == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but no CUDA GPU is available")
    if pref in ("cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
    return torch.device("cpu")


def setup(device_pref: str = "auto") -> DistInfo:
    """Join the process group when launched by torchrun; otherwise a single-process DistInfo."""
    world = env_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
    device = resolve_device(device_pref, local_rank)
    if world <= 1:
        return DistInfo(device=device)
    rank = int(os.environ["RANK"])
    initialized_here = False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
        initialized_here = True
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device,
                    initialized_here=initialized_here)


def teardown(info: DistInfo) -> None:
    if info.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


class MetaLossModule(nn.Module):
    """Routes ``forward`` to ``model.meta_loss`` so that DDP sees every training call
    (DDP synchronises gradients only for work done inside its ``forward``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, support_images: Tensor, support_labels: Tensor, query_images: Tensor,
                query_labels: Tensor, n_way: int | None = None) -> tuple[Tensor, Tensor]:
        if n_way is None:
            return self.model.meta_loss(support_images, support_labels, query_images,
                                        query_labels)
        return self.model.meta_loss(support_images, support_labels, query_images,
                                    query_labels, n_way=n_way)


def wrap(model: nn.Module, info: DistInfo) -> nn.Module:
    """A module whose ``forward(sx, sy, qx, qy)`` returns ``(loss, accuracy)``: the model's
    ``meta_loss``, wrapped in DDP when distributed."""
    step = MetaLossModule(model)
    if not info.distributed:
        return step
    from torch.nn.parallel import DistributedDataParallel

    ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(step, device_ids=ids, find_unused_parameters=False)


def barrier(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.barrier()


def all_gather_tensor(t: Tensor, info: DistInfo) -> list[Tensor]:
    """Every rank's copy of a same-shaped tensor (``[t]`` when not distributed)."""
    if not info.distributed:
        return [t]
    comm = t.to(info.device) if info.device.type == "cuda" else t
    out = [torch.empty_like(comm) for _ in range(info.world_size)]
    dist.all_gather(out, comm)
    return [o.cpu() for o in out]


def mean_across(value: float, info: DistInfo) -> float:
    """The mean of a scalar over ranks."""
    if not info.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64,
                     device=info.device if info.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return float(t.item()) / info.world_size


def any_across(flag: bool, info: DistInfo) -> bool:
    """True on every rank when ``flag`` is true on any rank (e.g. a time limit reached)."""
    if not info.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0],
                     device=info.device if info.device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def gather_json(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's JSON-serialisable ``obj`` (sent as UTF-8 bytes: no pickling)."""
    if not info.distributed:
        return [obj]
    raw = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8)
    n = torch.tensor([raw.numel()], dtype=torch.int64)
    sizes = all_gather_tensor(n, info)
    width = int(max(int(s.item()) for s in sizes))
    padded = torch.zeros(width, dtype=torch.uint8)
    padded[: raw.numel()] = raw
    parts = all_gather_tensor(padded, info)
    return [json.loads(bytes(p[: int(s.item())].tolist()).decode())
            for p, s in zip(parts, sizes, strict=True)]
