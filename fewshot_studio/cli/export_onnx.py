"""``fewshot-studio export-onnx``: export a checkpoint's embedding network to ONNX, checked
against torch."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fewshot_studio.cli import help_texts
from fewshot_studio.errors import UserError

# engine.onnx_export.PARITY_TOLERANCE, repeated here so that --help does not import torch
# (tests/test_cli_help.py checks that the two agree).
DEFAULT_TOLERANCE = 1e-4


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``export-onnx``."""
    p = subparsers.add_parser(
        "export-onnx", help="export a checkpoint's embedding network to ONNX",
        **help_texts(
            "Export model.embed (images (n, C, H, W) preprocessed as the checkpoint says -> "
            "features) to ONNX with a dynamic batch axis, and compare it with torch on random "
            "inputs; a file that differs by more than --tolerance is removed (exit 1).",
            "fewshot-studio export-onnx --checkpoint natural-protonet --out model.onnx"))
    p.add_argument("--checkpoint", required=True, help="bundled checkpoint name or a path")
    p.add_argument("--out", required=True, type=Path,
                   help="the .onnx file to write (an existing file must be one of our exports)")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                   help=f"largest allowed max abs difference (default {DEFAULT_TOLERANCE:g})")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Export, check against torch; exit code 0, or 1 when the check failed."""
    from fewshot_studio.engine.export import ensure_writable
    from fewshot_studio.engine.onnx_export import (
        export_embed_onnx,
        is_onnx_export,
        max_abs_difference,
    )
    from fewshot_studio.io.checkpoint import CheckpointError, load_checkpoint
    from fewshot_studio.paths import resolve_checkpoint

    path = resolve_checkpoint(args.checkpoint)
    ensure_writable(args.out)
    if args.out.exists() and not is_onnx_export(args.out):
        raise UserError(f"output file exists and is not an ONNX export of fewshot-studio, "
                        f"will not overwrite it: {args.out}")
    ckpt = load_checkpoint(path)
    try:
        model = ckpt.build("cpu")
    except Exception as e:
        raise CheckpointError(f"{path}: cannot build the model it describes "
                              f"({type(e).__name__}: {e})") from None
    export_embed_onnx(model, ckpt.preprocess, args.out, metadata=ckpt.metadata())
    diff = max_abs_difference(model, args.out, ckpt.preprocess)
    ok = diff <= args.tolerance
    print(f"wrote {args.out}: max abs difference vs torch {diff:.3g} "
          f"({'ok' if ok else 'FAILED'}, tolerance {args.tolerance:g})")
    if not ok:
        args.out.unlink(missing_ok=True)
        print(f"error: ONNX export differs from torch by {diff:.3g} > {args.tolerance:g}; "
              "file removed", file=sys.stderr)
        return 1
    return 0
