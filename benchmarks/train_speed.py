"""Meta-training speed, measured in one run on one device (the trainer's own step code:
EpisodeSampler -> BatchMaker (gather + normalise on the device) -> meta_loss -> Adam).

* ProtoNet, Conv4, 28 px, 60-way 5-shot 5-query Omniglot episodes/s, the dataset
  (images_background with 4 rotations) preloaded onto the device. Target on an H100-class GPU:
  >= 200 episodes/s.
* MAML, Conv4 (batch-statistics BN), 5-way 1-shot, 1 query per class (Finn et al.'s
  Omniglot setting), meta-batch 32, 5 inner steps:
  the torch.func-vectorised ``meta_loss`` vs the per-task Python loop ``meta_loss_loop``, first
  and second order; tasks/s and the vectorised/loop ratio. Target on a CUDA GPU: >= 5x.

    python benchmarks/train_speed.py [--device auto|cpu|cuda] [--quick]

Without the shared Omniglot data, random images of the same shape stand in (said so).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fewshot_studio.data.datasets import (
    ClassFolderDataset,
    InMemoryImages,
    default_data_dir,
    preload,
)
from fewshot_studio.data.preprocess import Preprocess
from fewshot_studio.data.sampler import EpisodeSampler
from fewshot_studio.models import create_backbone, create_method
from fewshot_studio.models.maml import meta_loss_loop
from fewshot_studio.training.distributed import (
    DistInfo,
    resolve_device,
    wrap,
)
from fewshot_studio.training.trainer import (
    BatchMaker,
    compile_step,
    hardware_name,
    make_optimizer,
    train_step,
)

PRE = Preprocess(image_size=28, channels=1)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def omniglot(device: torch.device) -> tuple[InMemoryImages, str]:
    path = default_data_dir() / "omniglot" / "images_background.zip"
    if path.is_file():
        t = time.perf_counter()
        mem = preload(ClassFolderDataset(path), PRE, rotations=(0, 90, 180, 270))
        took = time.perf_counter() - t
        return mem.to(device), (f"Omniglot images_background x 4 rotations "
                                f"({mem.num_classes} classes, {len(mem)} images, "
                                f"preloaded in {took:.1f} s)")
    g = torch.Generator().manual_seed(0)
    n_classes = 3856
    images = torch.randint(0, 256, (n_classes * 20, 1, 28, 28), dtype=torch.uint8, generator=g)
    targets = torch.arange(n_classes).repeat_interleave(20)
    return (InMemoryImages(images, targets, [str(i) for i in range(n_classes)]).to(device),
            f"random stand-in images ({path} not found)")


def timed(step: Callable[[], object], device: torch.device, warmup: int,
          steps: int, warm_step: Callable[[], object] | None = None) -> float:
    """Seconds per step after ``warmup`` untimed steps (of ``warm_step`` if given: a cheaper
    step that pays the same one-time costs)."""
    for _ in range(warmup):
        (warm_step or step)()
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - t) / steps


def bench_protonet(data: InMemoryImages, device: torch.device, warmup: int,
                   steps: int, trainer_defaults: bool = True, compiled: bool = False) -> float:
    """Episodes/s of the trainer's step. ``trainer_defaults=False``: the step as it was before
    the CUDA tuning (per-tensor Adam, indices copied from pageable memory), for the ratio.
    ``compiled``: the step as ``train --compile`` runs it (:func:`compile_step`)."""
    torch.manual_seed(0)
    model = create_method("protonet", create_backbone("conv4", in_channels=1,
                                                      image_size=28)).to(device)
    opt = make_optimizer(model.parameters(), 1e-3, device=device) if trainer_defaults \
        else torch.optim.Adam(model.parameters(), lr=1e-3)
    step_module = wrap(model, DistInfo(device=device))
    if compiled:
        step_module = compile_step(step_module, device)
    sampler = EpisodeSampler(data.targets, 60, 5, 5, seed=0)
    gen = torch.Generator(device=device).manual_seed(0)
    batches = BatchMaker(data.images, PRE, "none", gen, pinned=trainer_defaults)
    return 1.0 / timed(lambda: train_step(step_module, opt, batches(sampler.sample_batch(1)),
                                          n_way=60),
                       device, warmup, steps)


def bench_maml(data: InMemoryImages, device: torch.device, first_order: bool,
               vectorised: bool, warmup: int, steps: int, meta_batch: int = 32) -> float:
    torch.manual_seed(0)
    backbone = create_backbone("conv4", in_channels=1, image_size=28,
                               track_running_stats=False)
    model = create_method("maml", backbone, inner_steps=5, inner_lr=0.4,
                          first_order=first_order).to(device)
    opt = make_optimizer(model.parameters(), 1e-3, device=device)
    sampler = EpisodeSampler(data.targets, 5, 1, 1, seed=0)
    gen = torch.Generator(device=device).manual_seed(0)
    batches = BatchMaker(data.images, PRE, "none", gen)
    if vectorised:
        module = wrap(model, DistInfo(device=device))
    else:
        class Loop(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, *b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                return meta_loss_loop(self.model, *b)

        module = Loop()
    # On the CPU the warm-up steps use a 2-task meta-batch: same one-time costs, less time.
    warm_batch = meta_batch if device.type == "cuda" else min(2, meta_batch)
    sec = timed(lambda: train_step(module, opt, batches(sampler.sample_batch(meta_batch))),
                device, warmup, steps,
                lambda: train_step(module, opt, batches(sampler.sample_batch(warm_batch))))
    return meta_batch / sec


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--proto-steps", type=int, default=None)
    ap.add_argument("--maml-steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed steps before each measurement (default: 10 on CUDA, 1 on "
                         "the CPU)")
    ap.add_argument("--compile", action="store_true",
                    help="also time the ProtoNet step as `train --compile` runs it "
                         "(torch.compile; last, after the other figures)")
    ap.add_argument("--skip-maml", action="store_true", help="ProtoNet figures only")
    ap.add_argument("--quick", action="store_true", help="fewest steps (a smoke run)")
    args = ap.parse_args()
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    proto_steps = args.proto_steps or (200 if cuda else 5)
    maml_steps = args.maml_steps or (20 if cuda else 1)
    warm = args.warmup if args.warmup is not None else (10 if cuda else 1)
    if args.quick:
        proto_steps, maml_steps, warm = 2, 1, 1
    print(f"device: {hardware_name(device)}; torch {torch.__version__}; "
          f"threads {torch.get_num_threads()}; OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}")
    data, what = omniglot(device)
    print(f"data: {what}, held on {device}")

    eps = bench_protonet(data, device, warm, proto_steps)
    target = " (target >= 200 on an H100-class GPU)" if cuda else ""
    print(f"ProtoNet Conv4 60-way 5-shot 5-query: {eps:.1f} episodes/s "
          f"over {proto_steps} timed steps{target}")
    if cuda:
        before = bench_protonet(data, device, warm, proto_steps, trainer_defaults=False)
        print(f"  same step without fused Adam and pinned index copies: {before:.1f} "
              f"episodes/s (ratio {eps / before:.2f}x)")

    if not args.skip_maml:
        print("MAML Conv4 5-way 1-shot 1-query, meta-batch 32, 5 inner steps "
              f"({maml_steps} timed meta-step(s) each):")
    for fo, order in () if args.skip_maml else ((False, "second order"),
                                                 (True, "first order")):
        vec = bench_maml(data, device, fo, True, warm, maml_steps)
        loop = bench_maml(data, device, fo, False, warm, maml_steps)
        print(f"  {order:12s}: vectorised {vec:8.1f} tasks/s | per-task loop "
              f"{loop:8.1f} tasks/s | ratio {vec / loop:.2f}x"
              + (" (target >= 5x on CUDA)" if cuda else ""))
    if args.compile:
        t = time.perf_counter()
        try:
            comp = bench_protonet(data, device, max(warm, 3), proto_steps, compiled=True)
            print(f"ProtoNet step compiled (train --compile): {comp:.1f} "
                  f"episodes/s (ratio {comp / eps:.2f}x the trainer's step; compiling and "
                  f"warm-up took {time.perf_counter() - t:.0f} s)")
        except Exception as e:  # an experiment: report, never fail the benchmark
            print(f"compiled step failed: {type(e).__name__}: {e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
