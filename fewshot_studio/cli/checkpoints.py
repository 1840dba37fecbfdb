"""``fewshot-studio checkpoints``: list the bundled checkpoints (or describe given files).

One line per checkpoint: its name, what it is for (photos or characters, from the channels it
takes), the method and backbone, and its accuracy on 5-way 1-shot and 5-shot episodes of
classes it never saw in training. ``--long`` adds each checkpoint's description, input and
every recorded result."""

from __future__ import annotations

import argparse
import re
import textwrap
from pathlib import Path
from typing import Any

from fewshot_studio.cli import help_texts
from fewshot_studio.errors import UserError

HEADER = ("NAME", "FOR", "METHOD", "BACKBONE", "1-SHOT", "5-SHOT")

# "omniglot-evaluation 5w1s": a result's name ends in (or holds, as a word) "<way>w<shot>s".
_SETTING = re.compile(r"(?:^|\s)(\d+)w(\d+)s(?=\s|$)")
# Results that say nothing about unseen classes: validation (chose the checkpoint) and the
# temperature fit.
_NOT_HELD_OUT = re.compile(r"\bval(idation)?\b|calibration", re.IGNORECASE)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``checkpoints``."""
    p = subparsers.add_parser(
        "checkpoints", help="list the bundled checkpoints: what each is for, its accuracy",
        **help_texts(
            "List the bundled checkpoints: what each suits (photos or characters), its method "
            "and backbone, and its measured accuracy on 5-way 1-shot and 5-shot episodes of "
            "classes it never saw in training ('-': not measured). Or describe the checkpoint "
            "files given.",
            "fewshot-studio checkpoints",
            "fewshot-studio checkpoints --long runs/x/best.safetensors"))
    p.add_argument("files", nargs="*", type=Path,
                   help="checkpoint files to describe instead of the bundled ones")
    p.add_argument("-l", "--long", action="store_true",
                   help="also print each checkpoint's description, input and every recorded "
                        "result")
    p.set_defaults(func=run)


def _input(pre: dict[str, Any]) -> str:
    ch = {1: "gray", 3: "RGB"}.get(int(pre.get("channels", 0)), f"{pre.get('channels')}ch")
    return f"{pre.get('image_size', '?')}px {ch}"


def suited_for(meta: dict[str, Any]) -> str:
    """What a checkpoint suits: ``photos`` (RGB input), ``characters`` (grayscale input:
    handwritten characters, glyphs, line drawings), else ``-``."""
    channels = meta.get("preprocess", {}).get("channels")
    return {1: "characters", 3: "photos"}.get(channels, "-") if isinstance(channels, int) \
        else "-"


def _setting(name: str, res: dict[str, Any]) -> tuple[int, int] | None:
    """``(way, shot)`` of a result: its fields, else its name."""
    way, shot = res.get("way"), res.get("shot")
    if isinstance(way, int) and isinstance(shot, int):
        return way, shot
    m = _SETTING.search(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def held_out_result(evaluation: dict[str, Any], way: int,
                    shot: int) -> tuple[str, dict[str, Any]] | None:
    """The recorded ``way``-way ``shot``-shot result to show, as ``(name, result)``: plain ones
    only (no test-time augmentation or transductive refinement), never validation or
    calibration; one on a test set ("test" / "evaluation" in its name or data) first, then
    the most episodes, then the shortest name. None when there is none."""
    found = []
    for name, res in evaluation.items():
        if not isinstance(res, dict) or not isinstance(res.get("accuracy"), (int, float)):
            continue
        if res.get("tta") or res.get("transductive") or _NOT_HELD_OUT.search(name):
            continue
        if _setting(name, res) != (way, shot):
            continue
        where = f"{name} {res.get('data', '')}".lower()
        test = "test" in where or "evaluation" in where
        episodes = res.get("episodes") if isinstance(res.get("episodes"), int) else 0
        found.append(((not test, -episodes, len(name), name), name, res))
    return min(found, key=lambda f: f[0])[1:] if found else None


def _percent(res: dict[str, Any], ci: bool = True) -> str:
    """``97.9±0.2%`` (``ci``: with the 95% interval when recorded) or ``97.9%``."""
    acc = f"{100 * float(res['accuracy']):.1f}"
    half = res.get("ci95")
    if ci and isinstance(half, (int, float)) and half:
        return f"{acc}±{100 * float(half):.1f}%"
    return f"{acc}%"


def _variant(method: str, cfg: dict[str, Any]) -> str:
    if method == "maml":
        parts = ["ANIL" if cfg.get("anil") else "full"]
        if cfg.get("first_order"):
            parts.append("first-order")
        if cfg.get("meta_sgd"):
            parts.append("Meta-SGD")
        return f" ({', '.join(parts)})"
    variant = cfg.get("distance") or cfg.get("module")
    return f" ({variant})" if variant else ""


def describe(name: str, path: Path) -> list[str]:
    """Table cells for one checkpoint (see :data:`HEADER`)."""
    from fewshot_studio.io.checkpoint import read_metadata

    meta = read_metadata(path)
    model = meta.get("model", {})
    method = model.get("method", "?")
    evaluation = meta.get("evaluation", {})
    cells = [name, suited_for(meta), method + _variant(method, model.get("method_config", {})),
             model.get("backbone", "?")]
    for shot in (1, 5):
        found = held_out_result(evaluation, 5, shot)
        cells.append(_percent(found[1], ci=False) if found else "-")
    return cells


def details(path: Path) -> list[str]:
    """``--long``: the description, input and every recorded result, one per line."""
    from fewshot_studio.io.checkpoint import read_metadata

    meta = read_metadata(path)
    lines = textwrap.wrap(str(meta.get("description") or ""), 79, initial_indent="  ",
                          subsequent_indent="  ")
    lines.append(f"  input: {_input(meta.get('preprocess', {}))}")
    results = [(n, r) for n, r in sorted(meta.get("evaluation", {}).items())
               if isinstance(r, dict) and isinstance(r.get("accuracy"), (int, float))]
    width = max((len(n) for n, _ in results), default=0)
    lines += [f"  {n.ljust(width)}  {_percent(r)}" for n, r in results]
    return lines


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
            for r in rows]


def run(args: argparse.Namespace) -> int:
    """Print the table (and with ``--long`` the details); exit code 0."""
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
    for line in _table([list(HEADER), *(describe(name, path) for name, path in items)]):
        print(line)
    print("1-SHOT / 5-SHOT: 5-way accuracy on classes unseen in training ('-': not measured)")
    if args.long:
        for name, path in items:
            print(f"\n{name}:")
            for line in details(path):
                print(line)
    else:
        print("every recorded result, with its 95% interval: fewshot-studio checkpoints --long")
    return 0
