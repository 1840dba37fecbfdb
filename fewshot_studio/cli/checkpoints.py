"""``fewshot-studio checkpoints``: list the bundled checkpoints (or describe given files)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fewshot_studio.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "checkpoints", help="list the bundled checkpoints",
        description="List the bundled checkpoints (name, method, backbone, input, measured "
                    "accuracy), or describe the checkpoint files given.")
    p.add_argument("files", nargs="*", type=Path, help="checkpoint files to describe instead")
    p.set_defaults(func=run)


def _input(pre: dict[str, Any]) -> str:
    ch = {1: "gray", 3: "RGB"}.get(int(pre.get("channels", 0)), f"{pre.get('channels')}ch")
    return f"{pre.get('image_size', '?')}px {ch}"


def _accuracy(evaluation: dict[str, Any]) -> str:
    """The recorded accuracies, plain ones only: results with a test-time option
    (transductive refinement, test-time augmentation) are counted, not listed."""
    parts = []
    options = 0
    for name, res in sorted(evaluation.items()):
        if isinstance(res, dict) and (res.get("transductive") or res.get("tta")):
            options += 1
        elif isinstance(res, dict) and "accuracy" in res:
            acc = 100 * float(res["accuracy"])
            ci = res.get("ci95")
            parts.append(f"{name} {acc:.1f}" + (f"±{100 * float(ci):.1f}" if ci else "") + "%")
        elif isinstance(res, (int, float)):
            parts.append(f"{name} {100 * float(res):.1f}%")
    if options:
        parts.append(f"(+{options} with test-time options: checkpoints/README.md)")
    return "; ".join(parts) or "-"


def describe(name: str, path: Path) -> list[str]:
    """Table cells for one checkpoint: name, method, backbone, input, accuracy."""
    from fewshot_studio.io.checkpoint import read_metadata

    meta = read_metadata(path)
    model = meta.get("model", {})
    method = model.get("method", "?")
    return [name, method + _variant(method, model.get("method_config", {})),
            model.get("backbone", "?"), _input(meta.get("preprocess", {})),
            _accuracy(meta.get("evaluation", {}))]


def _variant(method: str, cfg: dict[str, Any]) -> str:
    if method == "maml":
        parts = ["ANIL" if cfg.get("anil") else "full",
                 "first-order" if cfg.get("first_order") else "second-order"]
        if cfg.get("meta_sgd"):
            parts.append("Meta-SGD")
        return f" ({', '.join(parts)})"
    variant = cfg.get("distance") or cfg.get("module")
    return f" ({variant})" if variant else ""


def run(args: argparse.Namespace) -> int:
    from fewshot_studio.paths import bundled_checkpoints, checkpoints_dir

    if args.files:
        items = [(p.stem, p) for p in args.files]
        for _, p in items:
            if not p.is_file():
                raise UserError(f"checkpoint not found: {p}")
    else:
        items = list(bundled_checkpoints().items())
        if not items:
            print(f"no bundled checkpoints (looked in {checkpoints_dir()})")
            return 0
    rows = [["NAME", "METHOD", "BACKBONE", "INPUT", "ACCURACY"]]
    rows += [describe(name, path) for name, path in items]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4])
    return 0
