"""``fewshot-studio import-backbone``: bring your own backbone. An ONNX image-embedding model
(a DINOv2 or CLIP image encoder exported to ONNX, say) or a timm model by name becomes a
checkpoint that ``label``, ``eval`` and the app use (:mod:`fewshot_studio.io.backbone_import`).

    fewshot-studio import-backbone dinov2_vits14.onnx --out dinov2.safetensors \\
        --image-size 224 --mean 0.485 0.456 0.406 --std 0.229 0.224 0.225
    fewshot-studio import-backbone --timm convnext_tiny.fb_in22k --out convnext.safetensors
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fewshot_studio.cli import help_texts
from fewshot_studio.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``import-backbone``."""
    p = subparsers.add_parser(
        "import-backbone",
        help="turn an ONNX image-embedding model or a timm model into a checkpoint",
        **help_texts(
            "Turn an ONNX image-embedding model (images -> one feature vector each), or a "
            "timm model by name (--timm), into a checkpoint for label, eval and the app: a "
            "ProtoNet around the model, with the many-shot head and open-set rejection "
            "(and, for a timm model, fine-tuning). For an ONNX model, how images are fed "
            "(size, mean/std, layout) comes from the options, else from the model's metadata "
            "(image_size, mean, std, layout, resize), else from its input shape and "
            "ImageNet's mean/std; the checkpoint holds the ONNX model itself: one file, no "
            "external data. For a timm model it comes from the options, else from its "
            "pretrained_cfg; its weights come from --weights, else timm's cache (offline) or "
            "the Hugging Face hub, and the checkpoint holds them (needs the timm extra).",
            "fewshot-studio import-backbone dinov2_vits14.onnx --out dinov2.safetensors \\\n"
            "    --image-size 224 --mean 0.485 0.456 0.406 --std 0.229 0.224 0.225\n"
            "fewshot-studio import-backbone --timm convnext_tiny.fb_in22k --out "
            "convnext.safetensors",
            "fewshot-studio label --checkpoint dinov2.safetensors --support examples/ \\\n"
            "    --query photos/ --out labels.csv"))
    p.add_argument("model", type=Path, nargs="?", default=None,
                   help="the .onnx file (weights inside, one file); or give --timm")
    p.add_argument("--timm", metavar="NAME", default=None,
                   help="a timm model name (e.g. convnext_tiny.fb_in22k) instead of a file")
    p.add_argument("--weights", type=Path, default=None,
                   help="with --timm: a local weights file (.safetensors or .pth) instead of "
                        "timm's cache or hub")
    p.add_argument("--out", required=True, type=Path, help="the .safetensors file to write")
    p.add_argument("--name", default="", help="the checkpoint's name (default: the file's)")
    p.add_argument("--image-size", type=int, default=None,
                   help="input side in pixels (default: metadata, else the input shape)")
    p.add_argument("--mean", type=float, nargs="+", default=None,
                   help="per-channel mean on [0, 1] pixels (default: metadata, else ImageNet)")
    p.add_argument("--std", type=float, nargs="+", default=None,
                   help="per-channel std on [0, 1] pixels (default: metadata, else ImageNet)")
    p.add_argument("--layout", choices=("NCHW", "NHWC"), default=None,
                   help="the input's layout (default: metadata, else the input shape)")
    p.add_argument("--resize", choices=("center_crop", "squash"), default=None,
                   help="how images are fitted to the input (default center_crop)")
    p.add_argument("--channels", type=int, choices=(1, 3), default=None,
                   help="input channels (default: the input shape, else 3)")
    p.add_argument("--distance", choices=("cosine", "euclidean"), default="cosine",
                   help="how queries are compared with the prototypes (default %(default)s)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Import, write the checkpoint (atomically), check that it loads and runs."""
    from fewshot_studio.io.backbone_import import InputOptions, import_onnx, import_timm_model
    from fewshot_studio.io.checkpoint import (
        CheckpointError,
        load_checkpoint,
        read_metadata,
        save_checkpoint,
    )

    if (args.model is None) == (args.timm is None):
        raise UserError("give either an ONNX model file or --timm NAME")
    if args.weights is not None and args.timm is None:
        raise UserError("--weights goes with --timm (an ONNX file holds its own weights)")
    if args.out.exists():
        try:
            imported = "imported" in read_metadata(args.out).get("training", {})
        except CheckpointError:
            imported = False
        if not imported:
            raise UserError(f"output file exists and is not a checkpoint made by "
                            f"import-backbone, will not overwrite it: {args.out}")
    options = InputOptions(args.image_size, tuple(args.mean) if args.mean else None,
                           tuple(args.std) if args.std else None, args.layout, args.resize,
                           args.channels)
    if args.timm is not None:
        ckpt = import_timm_model(args.timm, options, args.weights, args.name, args.distance)
    else:
        ckpt = import_onnx(args.model, options, args.name, args.distance)
    save_checkpoint(args.out, ckpt)
    load_checkpoint(args.out).build("cpu")  # it loads (and runs: the import probed it)
    pre = ckpt.preprocess
    print(f"wrote {args.out}: {ckpt.description}; input {pre.image_size} px, "
          f"{pre.channels} channel(s), mean {list(pre.mean)}, std {list(pre.std)}")
    return 0
