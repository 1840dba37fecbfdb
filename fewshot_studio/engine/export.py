"""Exports of a labeling run: the label file formats (:data:`EXPORT_FORMATS`, the one table;
the writers are in :mod:`.label_files`, the row schema in :mod:`.label_rows`, the output
checks in :mod:`.output_files`; their public names are re-exported here), and copying or
moving the query images into one folder per class.

Format table: :data:`EXPORT_FORMATS` (name -> :class:`ExportFormat`) is the one list of label
file formats: the CLI's ``--format`` choices, the app's File > Export menu and
:func:`format_for` read it. A format that can be written as a stream (rows added batch by
batch in path order, memory bounded: CSV and Parquet) has a ``sink``; ``label --ray`` writes
only those.

Class folders (:func:`class_folders`): a class goes into ``dest/<name>/`` when its name is
already a safe folder name (see :func:`safe_folder_name`), is not ``_unknown`` and no other
class of the run has the same name ignoring case; otherwise into
``dest/<safe name>-<8 hex digits>/``, the digits being the start of the SHA-1 of the UTF-8
class name (longer if that still collided). So ``x_y`` goes to ``x_y/`` and ``x:y`` to
``x_y-<hash>/``, a class named ``_unknown`` never mixes with the unknown images
(``dest/_unknown/``), and the same classes always give the same folders.

Copies claim their target name atomically (exclusive create, or a hard link for a move), so
two runs into one folder never overwrite each other's files; a name that exists gets ``_1``,
``_2``... before the suffix. A failed copy removes the partial file it created.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib.util
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from fewshot_studio.engine.api import Prediction, Status
from fewshot_studio.engine.label_files import (
    LABELSTUDIO_IMAGE_URL,
    PARQUET_NEEDS,
    RowSink,
    csv_sink,
    fiftyone_uuid,
    labelstudio_image_url,
    parquet_sink,
    read_csv,
    read_labels_csv,
    read_parquet,
    write_csv,
    write_duplicates_csv,
    write_fiftyone,
    write_json,
    write_labelstudio,
    write_parquet,
)
from fewshot_studio.engine.label_rows import (
    CSV_COLUMNS,
    DUPLICATES_COLUMNS,
    FIFTYONE_FORMAT,
    JSON_FORMAT,
    LABELSTUDIO_FORMAT,
    NON_FINITE_ERROR,
    checked,
    display_path,
    row_values,
    sorted_predictions,
)
from fewshot_studio.engine.output_files import (
    atomic_write,
    check_output,
    ensure_writable,
    is_labels_file,
)
from fewshot_studio.errors import UserError
from fewshot_studio.progress import Progress

__all__ = [
    "CSV_COLUMNS", "DUPLICATES_COLUMNS", "EXPORT_FORMATS", "FIFTYONE_FORMAT", "JSON_FORMAT",
    "LABELSTUDIO_FORMAT", "LABELSTUDIO_IMAGE_URL", "NON_FINITE_ERROR", "UNKNOWN_FOLDER",
    "ExportFormat", "LabelsWriter", "RowSink", "SinkOpener", "atomic_write", "check_output",
    "checked", "class_folders", "copy_to_class_folders", "csv_sink", "display_path",
    "ensure_writable", "fiftyone_uuid", "format_for", "is_labels_file",
    "labelstudio_image_url", "parquet_sink", "read_csv", "read_labels_csv", "read_parquet",
    "row_values", "safe_folder_name", "write_csv", "write_duplicates_csv", "write_fiftyone",
    "write_json", "write_labelstudio", "write_parquet",
]

UNKNOWN_FOLDER = "_unknown"


class LabelsWriter(Protocol):
    """What :attr:`ExportFormat.write` is called as."""

    def __call__(self, predictions: Sequence[Prediction], out: Path, root: Path, *,
                 absolute_paths: bool = False, classes: Sequence[str] = (),
                 model_version: str = "") -> Path: ...


class SinkOpener(Protocol):
    """What :attr:`ExportFormat.sink` is called as: a context manager that streams rows into
    ``out`` (see :func:`~.label_files.csv_sink`)."""

    def __call__(self, out: str | os.PathLike[str], root: Path,
                 absolute_paths: bool = False) -> AbstractContextManager[RowSink]: ...


@dataclass(frozen=True)
class ExportFormat:
    """A label file format: ``name`` (``--format``), the usual ``suffix``, ``title`` for file
    dialogs (``"CSV (*.csv)"``), ``help`` (one line), ``write`` (a :class:`LabelsWriter`;
    ``classes`` and ``model_version`` are used by the formats that store them), ``sink``
    (a :class:`SinkOpener` when the format can be streamed, else None) and ``needs`` (a
    module it needs that is an optional dependency, "" for none)."""

    name: str
    suffix: str
    title: str
    help: str
    write: LabelsWriter
    sink: SinkOpener | None = None
    needs: str = ""


def _csv_writer(predictions: Sequence[Prediction], out: Path, root: Path, *,
                absolute_paths: bool = False, classes: Sequence[str] = (),
                model_version: str = "") -> Path:
    return write_csv(predictions, out, root, absolute_paths)


def _json_writer(predictions: Sequence[Prediction], out: Path, root: Path, *,
                 absolute_paths: bool = False, classes: Sequence[str] = (),
                 model_version: str = "") -> Path:
    return write_json(predictions, out, root, absolute_paths)


def _labelstudio_writer(predictions: Sequence[Prediction], out: Path, root: Path, *,
                        absolute_paths: bool = False, classes: Sequence[str] = (),
                        model_version: str = "") -> Path:
    return write_labelstudio(predictions, out, root, absolute_paths, model_version)


def _fiftyone_writer(predictions: Sequence[Prediction], out: Path, root: Path, *,
                     absolute_paths: bool = False, classes: Sequence[str] = (),
                     model_version: str = "") -> Path:
    return write_fiftyone(predictions, out, root, absolute_paths, classes)


def _parquet_writer(predictions: Sequence[Prediction], out: Path, root: Path, *,
                    absolute_paths: bool = False, classes: Sequence[str] = (),
                    model_version: str = "") -> Path:
    return write_parquet(predictions, out, root, absolute_paths)


EXPORT_FORMATS: dict[str, ExportFormat] = {f.name: f for f in (
    ExportFormat("csv", ".csv", "CSV (*.csv)", "one row per image", _csv_writer, csv_sink),
    ExportFormat("json", ".json", "JSON (*.json)", "the CSV's rows as JSON", _json_writer),
    ExportFormat("labelstudio", ".json", "Label Studio tasks (*.json)",
                 "Label Studio task import with predictions", _labelstudio_writer),
    ExportFormat("fiftyone", ".json", "FiftyOne labels.json (*.json)",
                 "FiftyOne image classification labels.json", _fiftyone_writer),
    ExportFormat("parquet", ".parquet", "Parquet (*.parquet)",
                 "the CSV's rows, typed, for millions of rows (needs pyarrow)",
                 _parquet_writer, parquet_sink, needs="pyarrow"),
)}
"""The label file formats, in menu order (see :mod:`.label_files` for each)."""


def format_for(out: str | os.PathLike[str], name: str | None = None) -> ExportFormat:
    """The format ``name`` (UserError for an unknown one, or one whose optional dependency
    is not installed), or when None the one the suffix of ``out`` names: ``.json`` -> json,
    ``.parquet`` -> parquet, anything else -> csv."""
    if name is None:
        suffix = Path(out).suffix.lower()
        name = {".json": "json", ".parquet": "parquet"}.get(suffix, "csv")
    try:
        fmt = EXPORT_FORMATS[name]
    except KeyError:
        raise UserError(f"unknown format {name!r} (formats: "
                        f"{', '.join(EXPORT_FORMATS)})") from None
    if fmt.needs and importlib.util.find_spec(fmt.needs) is None:
        raise UserError(PARQUET_NEEDS if fmt.needs == "pyarrow"
                        else f"the {name} format needs {fmt.needs}")
    return fmt


_UNSAFE = re.compile(r'[\\/:*?"<>|\x00-\x1f]')
_MAX_FOLDER_CHARS = 100


def safe_folder_name(label: str) -> str:
    """A class name as a single, safe folder name (separators and reserved characters
    replaced by ``_``; never empty, ``.`` or ``..``; at most 100 characters)."""
    name = _UNSAFE.sub("_", label).strip().rstrip(".")[:_MAX_FOLDER_CHARS]
    if name in ("", ".", ".."):
        name = "_"
    return name


def class_folders(labels: Iterable[str]) -> dict[str, str]:
    """``{label: folder name}``, one-to-one and never ``_unknown`` (rule in the module
    docstring)."""
    labels = sorted(set(labels))
    base = {lab: safe_folder_name(lab) for lab in labels}
    safe = [lab for lab, name in base.items() if name == lab]
    owners: dict[str, int] = {}
    for lab in safe:
        owners[lab.casefold()] = owners.get(lab.casefold(), 0) + 1
    plain = {lab for lab in safe
             if owners[lab.casefold()] == 1 and lab.casefold() != UNKNOWN_FOLDER.casefold()}
    for digits in (8, 16, 40):  # longer hashes only if a class is literally named name-hash
        out = {lab: name if lab in plain else
               f"{name}-{hashlib.sha1(lab.encode('utf-8')).hexdigest()[:digits]}"
               for lab, name in base.items()}
        folded = [n.casefold() for n in (*out.values(), UNKNOWN_FOLDER)]
        if len(set(folded)) == len(folded):
            return out
    raise UserError("cannot give every class its own folder")  # needs a SHA-1 collision


def _copy_bytes(src: BinaryIO, dst: BinaryIO) -> None:
    """The copy primitive (tests replace it to simulate a full disk)."""
    shutil.copyfileobj(src, dst, 1 << 20)


def _claim(folder: Path, name: str, create: Callable[[Path], None]) -> Path:
    """Create ``folder/name`` (or ``stem_1.ext``, ``stem_2.ext``...) with ``create(target)``,
    which must fail with FileExistsError when the name is taken (never overwrite)."""
    stem, suffix = os.path.splitext(name)
    i = 0
    while True:
        target = folder / (name if i == 0 else f"{stem}_{i}{suffix}")
        try:
            create(target)
            return target
        except FileExistsError:
            i += 1


def _copy_new(src: Path, folder: Path) -> Path:
    """Copy ``src`` (bytes and metadata) to a new file in ``folder``; on failure the partial
    file is removed and the OSError raised."""
    with open(src, "rb") as fsrc:
        handle: list[BinaryIO] = []

        def create(target: Path) -> None:
            handle.append(open(target, "xb"))  # noqa: SIM115 (closed below)

        target = _claim(folder, src.name, create)
        try:
            with handle[0] as fdst:
                _copy_bytes(fsrc, fdst)
            shutil.copystat(src, target)
        except BaseException:
            with contextlib.suppress(OSError):
                target.unlink()
            raise
    return target


def _move_new(src: Path, folder: Path) -> Path:
    """Move ``src`` to a new name in ``folder``: a hard link then unlink on one filesystem,
    else an exclusive copy then unlink. Never replaces a file; on failure the source stays
    and anything created here is removed."""
    try:
        target = _claim(folder, src.name, lambda t: os.link(src, t))
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EMLINK):
            raise
        target = _copy_new(src, folder)  # another filesystem, or no hard links there
    try:
        os.unlink(src)
    except OSError as e:
        with contextlib.suppress(OSError):
            target.unlink()
        raise OSError(e.errno, f"cannot remove the original: {e.strerror or e}") from None
    return target


def copy_to_class_folders(predictions: Sequence[Prediction], dest: Path,
                          move: bool = False,
                          classes: Iterable[str] | None = None,
                          skip_unknown: bool = False) -> Iterator[Progress]:
    """Copy (or move) each labeled image into ``dest/<class folder>/`` (see
    :func:`class_folders`, computed over ``classes`` and the labels present); unknown
    ones go to ``dest/_unknown/`` (with ``skip_unknown`` they are left where they are, and
    counted as skipped); error rows are left where they are. Yields Progress per
    file with ``payload`` = ``(source, destination or None, error reason)``; the last one's
    ``metrics`` count ``copied`` (or ``moved``), ``failed`` and ``skipped``. A failure is
    counted and the next file goes on; nothing is ever overwritten."""
    dest = Path(dest)
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {dest}: {e.strerror or e}") from None
    preds = [checked(p) for p in sorted_predictions(predictions)]
    folders = class_folders({*(classes or ()), *(p.label for p in preds if p.label)})
    total = len(preds)
    verb = "moved" if move else "copied"
    counts = {verb: 0, "failed": 0, "skipped": 0}
    made: set[Path] = set()
    for i, p in enumerate(preds, 1):
        if p.status == Status.ERROR and not p.corrected:
            counts["skipped"] += 1
            yield Progress(i, total, "skipped (error)", dict(counts), (p.path, None, p.error))
            continue
        if skip_unknown and not p.label:
            counts["skipped"] += 1
            yield Progress(i, total, "skipped (unknown)", dict(counts), (p.path, None, ""))
            continue
        folder = dest / (folders[p.label] if p.label else UNKNOWN_FOLDER)
        try:
            if folder not in made:
                folder.mkdir(parents=True, exist_ok=True)
                made.add(folder)
            target = _move_new(p.path, folder) if move else _copy_new(p.path, folder)
        except OSError as e:
            counts["failed"] += 1
            yield Progress(i, total, f"failed: {p.path.name}", dict(counts),
                           (p.path, None, str(e.strerror or e)))
            continue
        counts[verb] += 1
        yield Progress(i, total, p.path.name, dict(counts), (p.path, target, ""))
