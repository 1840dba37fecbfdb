"""``fewshot-studio label``: label a folder of images from a folder of examples per class."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from fewshot_studio.cli import help_texts
from fewshot_studio.cli.label_extras import (
    abs_path,
    check_dest,
    check_project_target,
    known_labels,
    save_project,
)
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

if TYPE_CHECKING:
    from fewshot_studio.data.scan import QueryScan
    from fewshot_studio.engine.session import LabelingSession

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
                        + " (default: json for a .json --out, parquet for .parquet, else "
                          "csv)")
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
                        "auto: the head unless the prototypes do better on held-out examples; "
                        "finetune: fine-tune the backbone's last blocks on the examples "
                        "first (seconds; the fine-tuned copy is never saved) "
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
    p.add_argument("--backend", default="auto", metavar="NAME",
                   help="embedding backend: auto, onnxruntime or torch (the engine's "
                        "BACKEND_NAMES; default auto: torch on CUDA, else ONNX Runtime)")
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
                   help="embedding cache file (default: the user cache directory); with "
                        "--ray the workers open PATH on their own nodes (default there: no "
                        "cache)")
    p.add_argument("--batch-size", type=int, default=LabelSettings().batch_size, metavar="N",
                   help="images embedded at a time (default %(default)s); lower it if memory "
                        "runs out")
    p.add_argument("--save-project", type=Path, metavar="P.fsproj",
                   help="also write a project with the classes and their examples, the query "
                        "folder, the checkpoint and every prediction, to review in the app: "
                        "fewshot-studio P.fsproj")
    ray = p.add_argument_group("cluster", textwrap.fill(
        'Label on a Ray cluster (pip install "fewshot-studio[cluster]"; docs/scale.md): the '
        "examples are embedded here, the images by Ray workers, the rows stream to --out "
        "(csv or parquet). Not with --labels, --transductive, --adapt finetune, --copy-to, "
        "--move-to or --save-project.", 79))
    ray.add_argument("--ray", metavar="ADDRESS",
                     help="auto: the Ray cluster this machine belongs to; local: start a Ray "
                          "on this machine; or a cluster address (ray://HOST:10001)")
    ray.add_argument("--ray-workers", type=int, metavar="N",
                     help="N workers (default: as many as the cluster has room for now: one "
                          "per GPU, else one per --ray-cpus-per-worker CPUs; more wait for "
                          "an autoscaling cluster to add nodes)")
    ray.add_argument("--ray-cpus-per-worker", type=int, metavar="K",
                     help="CPUs each CPU worker reserves (default: min(8, the cluster's))")
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


def _within(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or under it (real paths)."""
    p, f = os.path.realpath(path), os.path.realpath(folder)
    return p == f or p.startswith(f.rstrip(os.sep) + os.sep)


def _exclusions(args: argparse.Namespace, dest: Path | None,
                class_names: list[str]) -> dict[Path, str]:
    """What the query scan leaves out, each with why: the support folder, the --out file and
    the destination's class folders (the whole destination when it is a sub-folder)."""
    from fewshot_studio.engine import export

    out = {abs_path(args.support): f"in the support folder {args.support}",
           abs_path(args.out): "being the --out file"}
    if dest is not None and _within(dest, args.query):
        why = f"in the {'--move-to' if args.move_to else '--copy-to'} folder {dest}"
        if os.path.realpath(dest) == os.path.realpath(args.query):  # sorting in place
            for name in (*export.class_folders(class_names).values(), export.UNKNOWN_FOLDER):
                out[abs_path(dest / name)] = why
        else:
            out[abs_path(dest)] = why
    return out


def _list_failures(what: str, failures: list[tuple[Path, str]], show: int = 5) -> None:
    for path, reason in failures[:show]:
        print(f"{what} {path}: {reason}", file=sys.stderr)
    if len(failures) > show:
        print(f"... and {len(failures) - show} more", file=sys.stderr)


def _nothing_to_label(args: argparse.Namespace, plan: Plan) -> int:
    """No image to label: the output with no image rows (a CSV of the header only; an
    unreadable sub-folder still gets its error row) and the project without predictions when
    asked for; the model is never loaded. An empty query folder (nothing left out either)
    gets "warning: no images in QUERY" and exit code 1; a folder whose images were all left
    out (sorted in place by an earlier run) is nothing to do: exit 0, or 1 for unreadable
    sub-folders."""
    n_excluded, unreadable = plan.n_excluded, plan.queries.unreadable
    empty = n_excluded == 0
    if empty:
        print(f"warning: no images in {args.query}", file=sys.stderr)
    plan.fmt.write(plan.folder_rows(), args.out, args.query,
                   absolute_paths=args.absolute_paths, classes=list(plan.classes))
    parts = [f"labeled 0 images; wrote {args.out}"]
    if args.save_project is not None:
        project_file = save_project(args.save_project, args, plan.classes, plan.settings,
                                    None, "")
        parts.append(f"project {project_file} (open it with: fewshot-studio {project_file})")
    if unreadable:
        parts.append(f"unreadable folders {len(unreadable)}")
    if n_excluded:
        parts.append(f"left out {n_excluded}")
    print("; ".join(parts))
    sys.stdout.flush()
    return 1 if empty or unreadable else 0


def _interactive() -> bool:
    """Whether stderr is a terminal (someone is watching)."""
    return hasattr(sys.stderr, "isatty") and sys.stderr.isatty()


@dataclass
class Plan:
    """What :func:`run` checked and found before any work."""

    fmt: ExportFormat
    classes: dict[str, list[Path]]
    dest: Path | None
    queries: QueryScan
    why: dict[Path, str]
    corrections: dict[Path, str]
    settings: LabelSettings

    @property
    def n_excluded(self) -> int:
        return sum(self.queries.excluded.values())

    def folder_rows(self) -> list[Prediction]:
        """An error row per query sub-folder that could not be read."""
        return [Prediction(folder, None, 0.0, 0.0, Status.ERROR, (),
                           f"cannot read folder: {reason}")
                for folder, reason in self.queries.unreadable]


@dataclass
class Outcome:
    """What a labeling run did, for the summary lines."""

    counts: dict[Status, int]
    seconds: float
    embedded: int
    cache_hits: int
    backend: str
    cache_note: str = ""
    cache_failures: int = 0
    copied: int = 0
    failures: list[tuple[Path, str]] = field(default_factory=list)
    project_file: Path | None = None


def _settings(args: argparse.Namespace) -> LabelSettings:
    """The run's settings from the options (UserError for an out-of-range number)."""
    threshold = DEFAULT_THRESHOLD if args.unknown_threshold is None else args.unknown_threshold
    if not 0.0 <= threshold <= 1.0:
        raise UserError(f"--unknown-threshold must be in [0, 1], got {threshold}")
    if not 0.0 <= args.miss_rate < 1.0:
        raise UserError(f"--miss-rate must be in [0, 1), got {args.miss_rate}")
    if args.batch_size < 1:
        raise UserError("--batch-size must be >= 1")
    return LabelSettings(unknown_threshold=threshold, unknown_rule=args.unknown_rule,
                         miss_rate=args.miss_rate, adapt=args.adapt,
                         transductive=args.transductive, recursive=not args.no_recursive,
                         device=args.device, batch_size=args.batch_size,
                         precision=args.precision, tta=args.tta)


def _check_ray(args: argparse.Namespace, fmt: ExportFormat) -> None:
    """``--ray``: a streamable format, and none of the options that need every prediction
    (or every query) at once on this machine."""
    if args.ray is None:
        if args.ray_workers is not None or args.ray_cpus_per_worker is not None:
            raise UserError("--ray-workers and --ray-cpus-per-worker need --ray")
        return
    if fmt.sink is None:
        streamed = [f.name for f in EXPORT_FORMATS.values() if f.sink is not None]
        raise UserError(f"--ray writes {' or '.join(streamed)}, not {fmt.name}")
    for option, value in (("--labels", args.labels), ("--transductive", args.transductive),
                          ("--adapt finetune", args.adapt == "finetune"),
                          ("--copy-to", args.copy_to), ("--move-to", args.move_to),
                          ("--save-project", args.save_project)):
        if value:
            raise UserError(f"{option} cannot be used with --ray (see docs/scale.md)")
    from fewshot_studio.cluster.driver import import_ray

    import_ray()  # UserError naming the extra when Ray is not installed


def _plan(args: argparse.Namespace) -> Plan:
    """Every check that can fail fast, before any work (UserError: exit 2)."""
    from fewshot_studio.data.scan import scan_images
    from fewshot_studio.engine import backends, export

    fmt = export.format_for(args.out, args.format)
    settings = _settings(args)
    _check_ray(args, fmt)
    backends.check_request(args.device, args.backend, args.precision)
    classes = support_classes(args.support)
    dest = args.copy_to or args.move_to
    if args.skip_unknown and dest is None:
        raise UserError("--skip-unknown needs --copy-to or --move-to")
    why = _exclusions(args, dest, list(classes))
    # --ray counts the images here and streams them later (cli.label_ray): no list of paths
    queries = scan_images(args.query, recursive=not args.no_recursive, exclude=list(why),
                          keep=args.ray is None)
    out_scanned = [abs_path(args.out)] if queries.excluded.get(abs_path(args.out)) else []
    export.check_output(args.out, [*queries, *(p for ps in classes.values() for p in ps),
                                   *out_scanned])
    if dest is not None:
        check_dest(dest)
    if args.save_project is not None:
        check_project_target(args)
    corrections = known_labels(args.labels, args.query, classes, queries)
    if args.ray is None:  # a cluster's CUDA is checked there
        backends.check_runnable(args.device, args.backend)
    return Plan(fmt, classes, dest, queries, why, corrections, settings)


def _note_left_out(plan: Plan) -> None:
    """The notes on what the scan left out and could not read."""
    if plan.n_excluded:
        reasons: dict[str, int] = {}
        for entry, n in plan.queries.excluded.items():
            if n:
                reasons[plan.why[entry]] = reasons.get(plan.why[entry], 0) + n
        print(f"note: left out {plan.n_excluded} image(s) under the query folder: "
              + ", ".join(f"{n} {r}" for r, n in reasons.items()), file=sys.stderr)
    for folder, reason in plan.queries.unreadable:
        print(f"warning: cannot read folder {folder}: {reason}", file=sys.stderr)


def outcome(counts: dict[Status, int], seconds: float, session: LabelingSession,
            embedded: int, cache_hits: int, backend: str) -> Outcome:
    """The summary of a run with ``session`` (its cache's state)."""
    c = session.counters
    note = "".join([
        f"; cache failures {c.cache_failures}" if c.cache_failures else "",
        f"; cache off: {c.cache_disabled}" if c.cache_disabled else "",
        f"; damaged cache moved to {c.cache_moved_aside}" if c.cache_moved_aside else ""])
    return Outcome(counts, seconds, embedded, cache_hits, backend, note, c.cache_failures)


def _copy(args: argparse.Namespace, plan: Plan, preds: list[Prediction], done: Outcome) -> None:
    """``--copy-to`` / ``--move-to``: into class folders, counted into ``done``."""
    from fewshot_studio.engine import export

    assert plan.dest is not None
    bar = ProgressBar("moving" if args.move_to else "copying", unit="file")
    for p in export.copy_to_class_folders(preds, plan.dest, move=args.move_to is not None,
                                          classes=list(plan.classes),
                                          skip_unknown=args.skip_unknown):
        bar.update(p, force=p.done == p.total)
        if p.metrics["failed"] > len(done.failures):
            done.failures.append((p.payload[0], p.payload[2]))
        done.copied = int(p.metrics["moved" if args.move_to else "copied"])
    bar.close()


def _label_here(args: argparse.Namespace, plan: Plan) -> Outcome:
    """Label on this machine, write the output, the project and the copies."""
    from fewshot_studio.engine import export
    from fewshot_studio.engine.session import LabelingSession

    t0 = time.perf_counter()
    with LabelingSession(args.checkpoint, plan.settings, cache_path=args.cache,
                         backend=args.backend) as session:
        session.set_support(plan.classes)
        for label in dict.fromkeys(plan.corrections.values()):
            session.correct([p for p, lab in plan.corrections.items() if lab == label], label)
        bar = ProgressBar("labeling", unit="img")
        for p in session.run(plan.queries):
            bar.update(p, force=p.done == p.total)
        bar.close()
        preds = [export.checked(p) for p in session.predictions()]
        counts = {s: sum(p.status == s for p in preds) for s in Status}
        c = session.counters
        backend = str(session.backend) if c.embedded else f"{session.backend} (nothing to embed)"
        done = outcome(counts, time.perf_counter() - t0, session, c.embedded, c.cache_hits,
                       backend)
        plan.fmt.write([*preds, *plan.folder_rows()], args.out, args.query,
                       absolute_paths=args.absolute_paths, classes=list(plan.classes),
                       model_version=session.checkpoint_name)
        if args.save_project is not None:
            done.project_file = save_project(args.save_project, args, plan.classes,
                                              plan.settings, preds,
                                              session.model_id.split(":")[0],
                                              session.embedding.feature_id())
        if plan.dest is not None:
            _copy(args, plan, preds, done)
    return done


def _report(args: argparse.Namespace, plan: Plan, done: Outcome) -> int:
    """The summary lines; the exit code."""
    _list_failures(f"failed to {'move' if args.move_to else 'copy'}", done.failures)
    n = sum(done.counts.values())
    n_unknown = done.counts[Status.UNKNOWN]
    rate = n / done.seconds if done.seconds > 0 else 0.0
    print(f"labeled {done.counts[Status.OK]}, unknown {n_unknown}, "
          f"errors {done.counts[Status.ERROR]} of {n} images in {done.seconds:.1f} s "
          f"({rate:.1f} images/s); embedded {done.embedded}, from cache {done.cache_hits}; "
          f"backend {done.backend}{done.cache_note}")
    parts = [f"wrote {args.out}"]
    if done.project_file is not None:
        parts.append(f"project {done.project_file} (open it with: fewshot-studio "
                     f"{done.project_file})")
    if plan.dest is not None:
        parts.append(f"{'moved' if args.move_to else 'copied'} {done.copied} files into "
                     f"{plan.dest}" + (f", {len(done.failures)} failed" if done.failures else "")
                     + (f", left {n_unknown} unknown" if args.skip_unknown and n_unknown
                        else ""))
    if plan.queries.unreadable:
        parts.append(f"unreadable folders {len(plan.queries.unreadable)}")
    if plan.n_excluded:
        parts.append(f"left out {plan.n_excluded}")
    print("; ".join(parts))
    sys.stdout.flush()
    return 1 if done.failures or plan.queries.unreadable or done.cache_failures else 0


def run(args: argparse.Namespace) -> int:
    """Label, write the output, then copy or move. Exit code: 0 all fine; 1 finished with
    failures (copies or moves, unreadable folders, the cache) or found no images to label (the
    output is written with no rows, the model is not loaded); 2 (UserError) refused before
    any work. On a terminal, "loading CHECKPOINT…" comes first. ``--ray``: on a Ray cluster
    (:mod:`fewshot_studio.cli.label_ray`)."""
    # On a terminal, a first line at once: importing the engine (torch) and loading the model
    # take seconds. Not for scripts and logs: there a refusal stays one "error:" line.
    if _interactive():
        print(f"loading {Path(args.checkpoint).name}\u2026", file=sys.stderr, flush=True)
    plan = _plan(args)
    _note_left_out(plan)
    if not plan.queries.total:
        return _nothing_to_label(args, plan)
    if args.ray is not None:
        from fewshot_studio.cli.label_ray import label_on_ray

        return _report(args, plan, label_on_ray(args, plan))
    return _report(args, plan, _label_here(args, plan))
