"""``fewshot-studio label``'s ``--labels`` (labels the user already has) and
``--save-project`` (a project file for the app)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fewshot_studio.engine.api import LabelSettings, Prediction
from fewshot_studio.errors import UserError


def abs_path(path: Path) -> Path:
    """``path`` made absolute (not resolved)."""
    return Path(os.path.abspath(path))


def check_dest(d: Path) -> None:
    """UserError unless ``d`` (or its nearest existing parent) is a writable folder."""
    probe = d
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK):
        raise UserError(f"cannot write into {d}")


def _project_checkpoint(checkpoint: str) -> str:
    """How a project names the checkpoint: a bundled name as it is, a file as an absolute
    path (a project is opened from elsewhere)."""
    from fewshot_studio.paths import bundled_checkpoints

    if checkpoint in bundled_checkpoints() and not Path(checkpoint).is_file():
        return checkpoint
    return os.path.abspath(Path(checkpoint).expanduser())


def check_project_target(args: argparse.Namespace) -> None:
    """``--save-project`` can be written: not with ``--move-to`` (the project would point at
    images that moved), a writable folder, and an existing file there must be a project."""
    from fewshot_studio.gui import project_io as pio

    if args.move_to is not None:
        raise UserError("--save-project cannot be used with --move-to (the project would "
                        "point at the images' old places); use --copy-to")
    target = args.save_project
    if target.suffix != pio.PROJECT_SUFFIX:
        target = target.with_name(target.name + pio.PROJECT_SUFFIX)
    check_dest(target.parent)
    if target.exists():
        try:
            pio.load_project(target)
        except UserError:
            raise UserError(f"--save-project: {target} exists and is not a FewShot Studio "
                            "project; not overwriting it") from None


def save_project(path: Path, args: argparse.Namespace, classes: dict[str, list[Path]],
                  settings: LabelSettings, predictions: list[Prediction] | None,
                  checkpoint_id: str, feature_id: str = "") -> Path:
    """``--save-project``: the same file the app saves (``project_io.save_project``);
    ``predictions`` None: never labeled (an empty query folder); ``feature_id``: the cache
    key of their features (the app's map reads them without a run)."""
    from fewshot_studio.gui import project_io as pio

    specs = [pio.ClassSpec(name, pio.PALETTE[i % len(pio.PALETTE)], list(paths))
             for i, (name, paths) in enumerate(classes.items())]
    saved = None if predictions is None else pio.SavedPredictions(
        checkpoint_id, predictions, [pio.file_stamp(p.path) for p in predictions], feature_id)
    project = pio.Project(classes=specs, query_folder=abs_path(args.query),
                          checkpoint=_project_checkpoint(args.checkpoint), settings=settings,
                          predictions=saved)
    return pio.save_project(project, path).path or path


def known_labels(source: Path | None, query: Path, classes: dict[str, list[Path]],
                 queries: list[Path]) -> dict[Path, str]:
    """``--labels``: read a path,label CSV or a folder of class sub-folders
    (:func:`~fewshot_studio.engine.label_files.read_known_labels`, as the app's File > Import
    labels). A query image becomes a correction (returned: ``{path: label}``), any other
    existing image a support example (added to ``classes``); a missing file is ignored with a
    note. UserError for an unreadable source or a class that --support does not have."""
    if source is None:
        return {}
    from fewshot_studio.engine.label_files import read_known_labels

    found = read_known_labels(source, query, queries, what="--labels")
    strange = sorted(found.labels - set(classes))
    if strange:
        raise UserError(f"--labels {source}: classes not in --support: "
                        + ", ".join(map(repr, strange[:5]))
                        + (f" and {len(strange) - 5} more" if len(strange) > 5 else ""))
    n_support = 0
    for label, paths in found.examples.items():
        for path in paths:
            if path not in classes[label]:
                classes[label].append(path)
                n_support += 1
    n_missing = len(found.missing)
    print(f"note: --labels: {len(found.corrections)} corrections, {n_support} support examples"
          + (f", {n_missing} missing files ignored" if n_missing else ""), file=sys.stderr)
    return found.corrections
