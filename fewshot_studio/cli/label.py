"""``fewshot-studio label``: label a folder of images from a folder of examples per class."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from fewshot_studio.cli import help_texts
from fewshot_studio.engine.api import (
    ADAPT_MODES,
    UNKNOWN_RULES,
    LabelSettings,
    Prediction,
    Status,
)
from fewshot_studio.engine.export import EXPORT_FORMATS, ExportFormat
from fewshot_studio.errors import UserError
from fewshot_studio.progress import ProgressBar

DEFAULT = LabelSettings()
DEFAULT_THRESHOLD = DEFAULT.unknown_threshold


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``label``."""
    p = subparsers.add_parser(
        "label", help="label a folder of images from example images per class",
        **help_texts(
            "Label every image under --query using the examples in --support (one sub-folder "
            "per class) and write a CSV or JSON. Exit code 0: all went well; 1: finished with "
            "failures, or no images in the query folder (the file is still written, with no "
            "rows); 2: refused to start (nothing written).",
            "fewshot-studio label --checkpoint natural-protonet --support examples/ \\\n"
            "    --query photos/ --out labels.csv --copy-to sorted/",
            "fewshot-studio label --checkpoint omniglot-protonet --support glyphs/ \\\n"
            "    --query scans/ --out labels.json --transductive --save-project scans.fsproj"))
    p.add_argument("--checkpoint", required=True,
                   help="a bundled checkpoint's name (see: fewshot-studio checkpoints) or a "
                        ".safetensors file")
    p.add_argument("--support", required=True, type=Path,
                   help="folder with one sub-folder of example images per class (images "
                        "directly in it are not examples)")
    p.add_argument("--query", required=True, type=Path, help="folder of images to label")
    p.add_argument("--out", required=True, type=Path, help="output file (labels.csv)")
    p.add_argument("--format", choices=tuple(EXPORT_FORMATS), default=None,
                   help="output format: " + "; ".join(f"{f.name}: {f.help}"
                                                      for f in EXPORT_FORMATS.values())
                        + " (default: json for a .json --out, else csv)")
    p.add_argument("--labels", type=Path, metavar="CSV|DIR",
                   help="labels you already have: a CSV with path and label columns (paths "
                        "relative to --query or absolute) or a folder with one sub-folder per "
                        "class (a folder of images alone: one class named after it); a query "
                        "image listed there is a correction, any other image a support "
                        "example of its class")
    p.add_argument("--unknown-rule", choices=UNKNOWN_RULES, default=DEFAULT.unknown_rule,
                   help="how an image becomes 'unknown': threshold (a fixed top probability, "
                        "--unknown-threshold) or adaptive (read off the examples: held out "
                        "in turn, they set how typical and how sure a label must be; see "
                        "--miss-rate; more precise, fewer labels off the photo domain, see "
                        f"benchmarks/open_set.py) (default {DEFAULT.unknown_rule}, as in "
                        "the app)")
    p.add_argument("--miss-rate", type=float, default=DEFAULT.miss_rate, metavar="R",
                   help="adaptive rule: the share of images of the known classes that may "
                        f"come out unknown as untypical (default {DEFAULT.miss_rate}); higher "
                        "rejects more strangers")
    p.add_argument("--unknown-threshold", type=float, default=None, metavar="P",
                   help="threshold rule: top probability below which an image is 'unknown' "
                        f"(default {DEFAULT_THRESHOLD}); also used by the adaptive rule when "
                        "every class has a single example")
    p.add_argument("--adapt", choices=ADAPT_MODES, default=DEFAULT.adapt,
                   help="none: class prototypes; head: a logistic-regression head fitted on "
                        "the examples (for 10-50 examples a class; ProtoNet checkpoints); "
                        "auto: the head unless the prototypes do better on held-out examples "
                        f"(default {DEFAULT.adapt})")
    p.add_argument("--transductive", action="store_true",
                   help="refine the class prototypes with the queries (soft k-means)")
    p.add_argument("--tta", action="store_true",
                   help="test-time augmentation: average each image's features over fixed "
                        "views of it (8 small warps for grayscale characters, the mirror "
                        "image for photos); more accurate, slower to embed")
    dest = p.add_mutually_exclusive_group()
    dest.add_argument("--copy-to", type=Path, metavar="DIR",
                      help="also copy the images into DIR/<label>/")
    dest.add_argument("--move-to", type=Path, metavar="DIR",
                      help="also move the images into DIR/<label>/")
    p.add_argument("--skip-unknown", action="store_true",
                   help="with --copy-to / --move-to: leave the unknown images where they are "
                        "(default: into DIR/_unknown/)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where the network runs (default auto: CUDA when it works, else "
                        "the CPU)")
    p.add_argument("--backend", choices=("auto", "onnxruntime", "torch"), default="auto",
                   help="embedding backend (default: torch on CUDA, else ONNX Runtime)")
    p.add_argument("--precision", choices=("fp32", "int8"), default=LabelSettings().precision,
                   help="int8: ONNX Runtime on the CPU runs a quantised model (1.5-1.9x "
                        "faster; predictions nearly always fp32's, see "
                        "benchmarks/int8_parity.py); ignored elsewhere "
                        f"(default {LabelSettings().precision})")
    p.add_argument("--absolute-paths", action="store_true",
                   help="write absolute paths (default: relative to --query)")
    p.add_argument("--no-recursive", action="store_true",
                   help="only images directly in --query, not in its sub-folders")
    p.add_argument("--cache", type=Path, metavar="PATH",
                   help="embedding cache file (default: the user cache directory)")
    p.add_argument("--batch-size", type=int, default=LabelSettings().batch_size, metavar="N",
                   help="images embedded at a time (default %(default)s); lower it if memory "
                        "runs out")
    p.add_argument("--save-project", type=Path, metavar="P.fsproj",
                   help="also write a project with the classes and their examples, the query "
                        "folder, the checkpoint and every prediction, to review in the app: "
                        "fewshot-studio P.fsproj")
    p.set_defaults(func=run)


def support_classes(root: Path) -> dict[str, list[Path]]:
    """The classes of the support folder by :func:`fewshot_studio.data.scan.class_folders`'
    rule (``root/<class>/**/<image>``, or a flat folder of images as one class): {class:
    sorted images}; UserError for a missing or unreadable folder, fewer than 2 classes or a
    class without image files."""
    from fewshot_studio.data.scan import class_folders

    classes = class_folders(root, what="support folder")
    for name, images in classes.items():
        if not images:
            raise UserError(f"support class {name!r} has no image files ({root / name})")
    if len(classes) < 2:
        raise UserError(f"need at least 2 classes (sub-folders with images) in {root}, "
                        f"found {len(classes)}")
    return classes


def _check_dest(d: Path) -> None:
    probe = d
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK):
        raise UserError(f"cannot write into {d}")


def _abs(path: Path) -> Path:
    return Path(os.path.abspath(path))


def _within(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or under it (real paths)."""
    p, f = os.path.realpath(path), os.path.realpath(folder)
    return p == f or p.startswith(f.rstrip(os.sep) + os.sep)


def _exclusions(args: argparse.Namespace, dest: Path | None,
                class_names: list[str]) -> dict[Path, str]:
    """What the query scan leaves out, each with why: the support folder, the --out file and
    the destination's class folders (the whole destination when it is a sub-folder)."""
    from fewshot_studio.engine import export

    out = {_abs(args.support): f"in the support folder {args.support}",
           _abs(args.out): "being the --out file"}
    if dest is not None and _within(dest, args.query):
        why = f"in the {'--move-to' if args.move_to else '--copy-to'} folder {dest}"
        if os.path.realpath(dest) == os.path.realpath(args.query):  # sorting in place
            for name in (*export.class_folders(class_names).values(), export.UNKNOWN_FOLDER):
                out[_abs(dest / name)] = why
        else:
            out[_abs(dest)] = why
    return out


def _project_checkpoint(checkpoint: str) -> str:
    """How a project names the checkpoint: a bundled name as it is, a file as an absolute
    path (a project is opened from elsewhere)."""
    from fewshot_studio.paths import bundled_checkpoints

    if checkpoint in bundled_checkpoints() and not Path(checkpoint).is_file():
        return checkpoint
    return os.path.abspath(Path(checkpoint).expanduser())


def _check_project_target(args: argparse.Namespace) -> None:
    """``--save-project`` can be written: not with ``--move-to`` (the project would point at
    images that moved), a writable folder, and an existing file there must be a project."""
    from fewshot_studio.gui import project_io as pio

    if args.move_to is not None:
        raise UserError("--save-project cannot be used with --move-to (the project would "
                        "point at the images' old places); use --copy-to")
    target = args.save_project
    if target.suffix != pio.PROJECT_SUFFIX:
        target = target.with_name(target.name + pio.PROJECT_SUFFIX)
    _check_dest(target.parent)
    if target.exists():
        try:
            pio.load_project(target)
        except UserError:
            raise UserError(f"--save-project: {target} exists and is not a FewShot Studio "
                            "project; not overwriting it") from None


def _save_project(path: Path, args: argparse.Namespace, classes: dict[str, list[Path]],
                  settings: LabelSettings, predictions: list[Prediction] | None,
                  checkpoint_id: str) -> Path:
    """``--save-project``: the same file the app saves (``project_io.save_project``);
    ``predictions`` None: never labeled (an empty query folder)."""
    from fewshot_studio.gui import project_io as pio

    specs = [pio.ClassSpec(name, pio.PALETTE[i % len(pio.PALETTE)], list(paths))
             for i, (name, paths) in enumerate(classes.items())]
    saved = None if predictions is None else pio.SavedPredictions(
        checkpoint_id, predictions, [pio.file_stamp(p.path) for p in predictions])
    project = pio.Project(classes=specs, query_folder=_abs(args.query),
                          checkpoint=_project_checkpoint(args.checkpoint), settings=settings,
                          predictions=saved)
    return pio.save_project(project, path).path or path


def _list_failures(what: str, failures: list[tuple[Path, str]], show: int = 5) -> None:
    for path, reason in failures[:show]:
        print(f"{what} {path}: {reason}", file=sys.stderr)
    if len(failures) > show:
        print(f"... and {len(failures) - show} more", file=sys.stderr)


def _nothing_to_label(args: argparse.Namespace, fmt: ExportFormat,
                      classes: dict[str, list[Path]],
                      settings: LabelSettings, unreadable: list[tuple[Path, str]],
                      n_excluded: int) -> int:
    """No image to label: the output with no image rows (a CSV of the header only; an
    unreadable sub-folder still gets its error row) and the project without predictions when
    asked for; the model is never loaded. An empty query folder (nothing left out either)
    gets "warning: no images in QUERY" and exit code 1; a folder whose images were all left
    out (sorted in place by an earlier run) is nothing to do: exit 0, or 1 for unreadable
    sub-folders."""
    empty = n_excluded == 0
    if empty:
        print(f"warning: no images in {args.query}", file=sys.stderr)
    rows = [Prediction(folder, None, 0.0, 0.0, Status.ERROR, (),
                       f"cannot read folder: {reason}") for folder, reason in unreadable]
    fmt.write(rows, args.out, args.query, absolute_paths=args.absolute_paths,
              classes=list(classes))
    parts = [f"labeled 0 images; wrote {args.out}"]
    if args.save_project is not None:
        project_file = _save_project(args.save_project, args, classes, settings, None, "")
        parts.append(f"project {project_file} (open it with: fewshot-studio {project_file})")
    if unreadable:
        parts.append(f"unreadable folders {len(unreadable)}")
    if n_excluded:
        parts.append(f"left out {n_excluded}")
    print("; ".join(parts))
    sys.stdout.flush()
    return 1 if empty or unreadable else 0


def _known_labels(source: Path | None, query: Path, classes: dict[str, list[Path]],
                  queries: list[Path]) -> dict[Path, str]:
    """``--labels``: read a path,label CSV or a folder of class sub-folders. A query image
    becomes a correction (returned: ``{path: label}``), any other existing image a support
    example (added to ``classes``); a missing file is ignored with a note. UserError for an
    unreadable source or a class that --support does not have."""
    if source is None:
        return {}
    from fewshot_studio.data.scan import class_folders
    from fewshot_studio.engine import export

    if source.is_dir():
        pairs = [(p, name) for name, images in class_folders(source, what="--labels folder")
                 .items() for p in images]
        if not pairs:
            raise UserError(f"--labels {source}: no class sub-folders with images")
    elif source.exists():
        pairs = export.read_labels_csv(source, query)
    else:
        raise UserError(f"--labels not found: {source}")
    strange = sorted({label for _, label in pairs} - set(classes))
    if strange:
        raise UserError(f"--labels {source}: classes not in --support: "
                        + ", ".join(map(repr, strange[:5]))
                        + (f" and {len(strange) - 5} more" if len(strange) > 5 else ""))
    in_query = set(queries)
    corrections: dict[Path, str] = {}
    n_support = n_missing = 0
    for path, label in pairs:
        if path in in_query:
            corrections[path] = label
        elif path.is_file():
            if path not in classes[label]:
                classes[label].append(path)
                n_support += 1
        else:
            n_missing += 1
    print(f"note: --labels: {len(corrections)} corrections, {n_support} support examples"
          + (f", {n_missing} missing files ignored" if n_missing else ""), file=sys.stderr)
    return corrections


def _interactive() -> bool:
    """Whether stderr is a terminal (someone is watching)."""
    return hasattr(sys.stderr, "isatty") and sys.stderr.isatty()


def run(args: argparse.Namespace) -> int:
    """Label, write the CSV/JSON, then copy or move. Exit code: 0 all fine; 1 finished with
    failures (copies or moves, unreadable folders, the cache) or found no images to label (the
    output is written with no rows, the model is not loaded); 2 (UserError) refused before
    any work. On a terminal, "loading CHECKPOINT…" comes first."""
    # On a terminal, a first line at once: importing the engine (torch) and loading the model
    # take seconds. Not for scripts and logs: there a refusal stays one "error:" line.
    if _interactive():
        print(f"loading {Path(args.checkpoint).name}\u2026", file=sys.stderr, flush=True)
    from fewshot_studio.data.scan import scan_images
    from fewshot_studio.engine import export
    from fewshot_studio.engine.session import LabelingSession

    # Every check that can fail fast happens before any work.
    fmt = export.format_for(args.out, args.format)
    threshold = DEFAULT_THRESHOLD if args.unknown_threshold is None else args.unknown_threshold
    rule = args.unknown_rule
    if not 0.0 <= threshold <= 1.0:
        raise UserError(f"--unknown-threshold must be in [0, 1], got {threshold}")
    if not 0.0 <= args.miss_rate < 1.0:
        raise UserError(f"--miss-rate must be in [0, 1), got {args.miss_rate}")
    if args.batch_size < 1:
        raise UserError("--batch-size must be >= 1")
    classes = support_classes(args.support)
    dest = args.copy_to or args.move_to
    if args.skip_unknown and dest is None:
        raise UserError("--skip-unknown needs --copy-to or --move-to")
    why = _exclusions(args, dest, list(classes))
    queries = scan_images(args.query, recursive=not args.no_recursive, exclude=list(why))
    out_scanned = [_abs(args.out)] if queries.excluded.get(_abs(args.out)) else []
    export.check_output(args.out, [*queries, *(p for ps in classes.values() for p in ps),
                                   *out_scanned])
    if dest is not None:
        _check_dest(dest)
    if args.save_project is not None:
        _check_project_target(args)
    corrections = _known_labels(args.labels, args.query, classes, queries)
    if args.device == "cuda":
        from fewshot_studio.engine.backends import onnxruntime_providers, torch_cuda_works

        if not (torch_cuda_works() or "CUDAExecutionProvider" in onnxruntime_providers()):
            raise UserError("--device cuda: no working CUDA (torch has none and onnxruntime-gpu "
                            "is not installed); use --device auto or cpu")
    n_excluded = sum(queries.excluded.values())
    if n_excluded:
        reasons: dict[str, int] = {}
        for entry, n in queries.excluded.items():
            if n:
                reasons[why[entry]] = reasons.get(why[entry], 0) + n
        print(f"note: left out {n_excluded} image(s) under the query folder: "
              + ", ".join(f"{n} {r}" for r, n in reasons.items()), file=sys.stderr)
    for folder, reason in queries.unreadable:
        print(f"warning: cannot read folder {folder}: {reason}", file=sys.stderr)
    settings = LabelSettings(unknown_threshold=threshold, unknown_rule=rule,
                             miss_rate=args.miss_rate, adapt=args.adapt,
                             transductive=args.transductive, recursive=not args.no_recursive,
                             device=args.device, batch_size=args.batch_size,
                             precision=args.precision, tta=args.tta)
    if not queries:
        return _nothing_to_label(args, fmt, classes, settings, queries.unreadable, n_excluded)
    t0 = time.perf_counter()
    failures: list[tuple[Path, str]] = []
    copied = 0
    with LabelingSession(args.checkpoint, settings, cache_path=args.cache,
                         backend=args.backend) as session:
        session.set_support(classes)
        for label in dict.fromkeys(corrections.values()):
            session.correct([p for p, lab in corrections.items() if lab == label], label)
        bar = ProgressBar("labeling", unit="img")
        for p in session.run(queries):
            bar.update(p, force=p.done == p.total)
        bar.close()
        preds = [export.checked(p) for p in session.predictions()]
        seconds = time.perf_counter() - t0
        folder_rows = [Prediction(folder, None, 0.0, 0.0, Status.ERROR, (),
                                  f"cannot read folder: {reason}")
                       for folder, reason in queries.unreadable]
        fmt.write([*preds, *folder_rows], args.out, args.query,
                  absolute_paths=args.absolute_paths, classes=list(classes),
                  model_version=session.checkpoint_name)
        if args.save_project is not None:
            project_file = _save_project(args.save_project, args, classes, settings, preds,
                                         session.model_id.split(":")[0])
        if dest is not None:
            bar = ProgressBar("moving" if args.move_to else "copying", unit="file")
            for p in export.copy_to_class_folders(preds, dest, move=args.move_to is not None,
                                                  classes=list(classes),
                                                  skip_unknown=args.skip_unknown):
                bar.update(p, force=p.done == p.total)
                if p.metrics["failed"] > len(failures):
                    failures.append((p.payload[0], p.payload[2]))
                copied = int(p.metrics["moved" if args.move_to else "copied"])
            bar.close()
        counters, backend = session.counters, session.backend
    verb = "move" if args.move_to else "copy"
    _list_failures(f"failed to {verb}", failures)
    n_ok = sum(p.status == Status.OK for p in preds)
    n_unknown = sum(p.status == Status.UNKNOWN for p in preds)
    n_err = sum(p.status == Status.ERROR for p in preds)
    rate = len(preds) / seconds if seconds > 0 else 0.0
    backend_s = str(backend) if counters.embedded else f"{backend} (nothing to embed)"
    cache_s = "".join([
        f"; cache failures {counters.cache_failures}" if counters.cache_failures else "",
        f"; cache off: {counters.cache_disabled}" if counters.cache_disabled else "",
        f"; damaged cache moved to {counters.cache_moved_aside}"
        if counters.cache_moved_aside else ""])
    print(f"labeled {n_ok}, unknown {n_unknown}, errors {n_err} of {len(preds)} images "
          f"in {seconds:.1f} s ({rate:.1f} images/s); embedded {counters.embedded}, "
          f"from cache {counters.cache_hits}; backend {backend_s}{cache_s}")
    parts = [f"wrote {args.out}"]
    if args.save_project is not None:
        parts.append(f"project {project_file} (open it with: fewshot-studio {project_file})")
    if dest is not None:
        done = "moved" if args.move_to else "copied"
        parts.append(f"{done} {copied} files into {dest}"
                     + (f", {len(failures)} failed" if failures else "")
                     + (f", left {n_unknown} unknown" if args.skip_unknown and n_unknown
                        else ""))
    if queries.unreadable:
        parts.append(f"unreadable folders {len(queries.unreadable)}")
    if n_excluded:
        parts.append(f"left out {n_excluded}")
    print("; ".join(parts))
    sys.stdout.flush()
    return 1 if failures or queries.unreadable or counters.cache_failures else 0
