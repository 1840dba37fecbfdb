"""The budgets of ``scripts/train_checkpoints.py``: the exact training arguments of every
bundled checkpoint and papers'-protocol run, per budget (cpu, gpu, full)."""

from __future__ import annotations

from typing import Any

from bundled.common import Ctx

OMNI_COMMON = ["--backbone", "conv4", "--rotations", "0", "90", "180", "270",
               "--split", "random", "--val-classes", "0.1", "--seed", "0", "--device", "auto"]


def protonet_cpu(episodes: int, val_every: int, time_limit: int) -> list[str]:
    """The cpu budget's ProtoNet schedule: 30-way 5-shot 5-query, Adam + cosine, no
    augmentation, 20-way 1-shot validation, stopped by ``--time-limit`` (s)."""
    return ["--method", "protonet", "--augment", "none", "--way", "30", "--shot", "5",
            "--query", "5", "--episodes", str(episodes), "--lr", "0.001", "--schedule",
            "cosine", "--val-every", str(val_every), "--val-episodes", "200", "--val-way",
            "20", "--val-shot", "1", "--time-limit", str(time_limit), "--log-every", "20"]


# The gpu budget: what one short GPU lease affords (about 15 minutes of one H100 for
# everything). All six Omniglot trainings (shipped + papers' protocol) run at once on the one
# GPU, each stopped by its time limit, with the cosine schedule fitted to that time
# (``--fit-schedule``); the episodes trained are recorded in each checkpoint.
LEASE_TRAIN_S = 300


def lease(args: list[str], val_every: int = 1000) -> list[str]:
    """``args`` + the gpu budget's common tail: omniglot augmentation at half strength,
    cosine schedule fitted to ``LEASE_TRAIN_S``, 20-way 1-shot validation."""
    return [*args, "--augment", "omniglot", "--augment-strength", "0.5", "--episodes",
            "200000", "--lr", "0.001", "--schedule", "cosine", "--warmup", "200",
            "--val-every", str(val_every), "--val-episodes", "300", "--val-way", "20",
            "--val-shot", "1", "--time-limit", str(LEASE_TRAIN_S), "--fit-schedule",
            "--log-every", "100"]


OMNIGLOT_TRAIN: dict[str, dict[str, list[str]]] = {
    "omniglot-protonet": {
        "cpu": protonet_cpu(1400, 200, 2100),
        "full": ["--method", "protonet", "--augment", "omniglot", "--way", "60", "--shot", "5",
                 "--query", "10", "--episodes", "100000", "--lr", "0.001", "--schedule",
                 "cosine", "--warmup", "500", "--val-every", "2000", "--val-episodes", "600",
                 "--val-way", "20", "--val-shot", "1", "--amp", "--log-every", "200"],
        "gpu": lease(["--method", "protonet", "--way", "60", "--shot", "5", "--query", "5"],
                     val_every=2000),
    },
    "omniglot-relation": {
        "cpu": ["--method", "relation", "--method-arg", "module=conv",
                "--backbone-arg", "pool_layers=2", "--augment", "none", "--way", "5",
                "--shot", "1", "--query", "15", "--episodes", "1500", "--lr", "0.001",
                "--schedule", "cosine", "--val-every", "250", "--val-episodes", "300",
                "--val-way", "5", "--val-shot", "1", "--time-limit", "720",
                "--log-every", "20"],
        "full": ["--method", "relation", "--method-arg", "module=conv",
                 "--backbone-arg", "pool_layers=2", "--augment", "omniglot", "--way", "20",
                 "--shot", "1", "--query", "10", "--episodes", "100000", "--lr", "0.001",
                 "--schedule", "cosine", "--warmup", "500", "--val-every", "2000",
                 "--val-episodes", "600", "--val-way", "20", "--val-shot", "1", "--amp",
                 "--log-every", "200"],
        "gpu": lease(["--method", "relation", "--method-arg", "module=conv",
                      "--backbone-arg", "pool_layers=2", "--way", "20", "--shot", "1",
                      "--query", "10"], val_every=1000),
    },
    "omniglot-maml": {
        "cpu": ["--method", "maml", "--method-arg", "anil=true",
                "--method-arg", "inner_steps=2", "--method-arg", "test_inner_steps=5",
                "--augment", "none", "--way", "20", "--shot", "1", "--query", "5",
                "--meta-batch", "2", "--episodes", "600", "--lr", "0.001", "--schedule",
                "cosine", "--val-every", "250", "--val-episodes", "200", "--val-way", "20",
                "--val-shot", "1", "--time-limit", "720", "--log-every", "20"],
        "full": ["--method", "maml", "--method-arg", "first_order=false",
                 "--backbone-arg", "track_running_stats=false", "--method-arg",
                 "inner_steps=5", "--method-arg", "test_inner_steps=10", "--method-arg",
                 "meta_sgd=true", "--augment", "omniglot", "--way", "20", "--shot", "1",
                 "--query", "5", "--meta-batch", "16", "--episodes", "30000", "--lr", "0.001",
                 "--schedule", "cosine", "--warmup", "500", "--val-every", "1000",
                 "--val-episodes", "600", "--val-way", "20", "--val-shot", "1",
                 "--log-every", "100"],
        # ANIL (the head alone adapts, second order) with the Proto-MAML head: what the
        # lease affords; full MAML (every layer adapts) is the full budget's
        "gpu": lease(["--method", "maml", "--method-arg", "anil=true", "--method-arg",
                      "inner_steps=3", "--method-arg", "test_inner_steps=5",
                      "--way", "20", "--shot", "1", "--query", "10", "--meta-batch", "4"],
                     val_every=1000),
    },
}
# A second phase continuing a run (``train --resume``; the cosine schedule is recomputed for
# the new total, i.e. a warm restart). ``--time-limit`` counts the first phase's time too.
CONTINUE: dict[str, dict[str, list[str]]] = {
    "omniglot-protonet": {"cpu": ["--episodes", "3800", "--time-limit", "3150"]},
    # the first phase's 2700 s ran out at 1990 of its 5000 episodes (a loaded machine)
    "paper-protonet": {"cpu": ["--time-limit", "4500"]},
}
DESCRIPTIONS = {
    "omniglot-protonet": "Conv4 Prototypical Network (squared Euclidean), 28 px grayscale, "
                         "meta-trained on Omniglot images_background with 90/180/270 "
                         "rotations as classes",
    "omniglot-relation": "Conv4 (2 poolings, 64x7x7 maps) + convolutional relation module "
                         "(Sung et al. 2018), 28 px grayscale, meta-trained on Omniglot "
                         "images_background with 90/180/270 rotations as classes",
    "omniglot-maml": "Conv4 MAML with a Proto-MAML head, meta-trained on Omniglot "
                     "images_background with 90/180/270 rotations as classes",
}
# The papers' protocol (Vinyals trainval -> test), not shipped: the full budget's schedules;
# the cpu budget has a short ProtoNet run only (``--steps paper-protonet``), far from the
# papers' schedules.
PAPER_TRAIN: dict[str, dict[str, list[str]]] = {
    "paper-protonet": {
        "cpu": protonet_cpu(5000, 250, 2700),
        "full": OMNIGLOT_TRAIN["omniglot-protonet"]["full"],
        "gpu": OMNIGLOT_TRAIN["omniglot-protonet"]["gpu"]},
    "paper-relation": {b: OMNIGLOT_TRAIN["omniglot-relation"][b] for b in ("full", "gpu")},
    "paper-maml": {b: OMNIGLOT_TRAIN["omniglot-maml"][b] for b in ("full", "gpu")},
}
NATURAL_FULL: dict[str, list[str]] = {
    "natural-protonet": ["--method", "protonet", "--method-arg", "pool=avg",
                         "--method-arg", "distance=cosine", "--method-arg", "learn_scale=true",
                         "--way", "10", "--shot", "1", "--query", "10", "--lr", "0.00005"],
    "natural-relation": ["--method", "relation", "--method-arg", "module=mlp",
                         "--way", "5", "--shot", "1", "--query", "15", "--lr", "0.0001"],
    "natural-maml": ["--method", "maml", "--method-arg", "anil=true", "--method-arg",
                     "pool=avg", "--method-arg", "meta_sgd=true", "--method-arg",
                     "inner_steps=3", "--method-arg", "inner_lr=0.01", "--way", "5",
                     "--shot", "1", "--query", "15", "--meta-batch", "4", "--lr", "0.00005"],
}
NATURAL_FULL_COMMON = ["--backbone", "efficientnet_lite0", "--backbone-arg", "pretrained=true",
                       "--backbone-arg", "readout=multilevel",
                       "--image-size", "224", "--mean", "0.5", "0.5", "0.5", "--std", "0.5",
                       "0.5", "0.5", "--resize", "center_crop", "--split", "files",
                       "--augment", "photo", "--episodes", "6000", "--schedule", "cosine",
                       "--warmup", "200", "--weight-decay", "0.00001", "--val-every", "500",
                       "--val-episodes", "300", "--val-way", "5", "--val-shot", "1",
                       "--seed", "0", "--device", "auto", "--amp", "--log-every", "50"]


def schedule(ctx: Ctx, args: list[str]) -> list[str]:
    """A training's arguments, with the script's ``--time-limit`` replacing the gpu budget's
    per-training limit when given."""
    args = list(args)
    if ctx.budget == "gpu" and ctx.time_limit and "--time-limit" in args:
        args[args.index("--time-limit") + 1] = f"{ctx.time_limit:g}"
    return args


# Every natural-* model reads Lite0's features out at two levels (the head conv's map and the
# last block's output; `lite0_readout`): that alone, before any training, validates above the
# baseline (each training's step 0), and it is what lifts 5-way 5-shot (see NOTES["cpu"]).
MULTILEVEL = {"readout": "multilevel"}
NATURAL_CPU: dict[str, dict[str, Any]] = {
    "natural-protonet": {"method": "protonet", "backbone": MULTILEVEL,
                         "kwargs": {"pool": "avg", "distance": "cosine", "learn_scale": True},
                         "way": 10, "shot": (1, 5), "query": 10, "val_shots": (1, 5),
                         "steps": 1500, "lr_head": 2e-4, "lr_method": 1e-3},
    "natural-relation": {"method": "relation", "backbone": MULTILEVEL,
                         "kwargs": {"module": "mlp", "hidden": 256, "fc_hidden": 8,
                                    "skip": "cosine"},
                         "way": 5, "shot": 1, "query": 15, "steps": 2000, "lr_head": 1e-4,
                         "lr_method": 1e-3},
    "natural-maml": {"method": "maml", "backbone": MULTILEVEL,
                     "kwargs": {"anil": True, "pool": "avg", "meta_sgd": True,
                                "inner_steps": 3, "inner_lr": 0.01, "first_order": False,
                                "normalize": True},
                     "way": 5, "shot": (1, 5), "query": 15, "val_shots": (1, 5),
                     "steps": 600, "lr_head": 3e-4, "lr_method": 1e-3},
}
VAL_EVERY = 100
GRAD_CLIP = 5.0


# name -> (the card's label, changes to the baseline's model spec): nothing meta-trained
BASELINE_VARIANTS: dict[str, tuple[str, dict[str, dict[str, Any]]]] = {
    "natural-baseline-euclidean": ("baseline, squared Euclidean",
                                   {"method_config": {"distance": "euclidean", "scale": 1.0}}),
    "natural-baseline-multilevel": (
        "baseline read out at two levels (head + last block, block weight 0.7), cosine "
        "nearest-centroid, not meta-trained", {"backbone_config": MULTILEVEL}),
}
