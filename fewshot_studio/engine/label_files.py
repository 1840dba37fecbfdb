"""Label files: the tabular formats of :mod:`.export`'s ``EXPORT_FORMATS`` (rows from
:func:`~.label_rows.row_values`, one schema for every format), the duplicates CSV, and
reading known labels back (a labels CSV or class folders: :func:`read_known_labels`).

CSV (UTF-8, a header, one row per query file sorted by path), columns
:data:`~.label_rows.CSV_COLUMNS`, numbers with 6 decimals, empty cells for None, booleans
``true``/``false``, spreadsheet-safe (see :mod:`.label_rows`).

JSON: ``{"format": "fewshot-studio/labels-1", "root": ..., "columns": [...], "rows": [...]}``
where each row has the CSV's fields with JSON types (numbers, null, booleans).

Parquet (``pip install "fewshot-studio[cluster]"`` for pyarrow): the CSV's columns with
types (strings, float64, bool; nulls where the JSON has null), in row groups of
:data:`PARQUET_ROW_GROUP` rows, the key-value metadata ``format`` =
``fewshot-studio/labels-1``. For millions of rows (``label --ray``).

CSV and Parquet can be written as a stream (:func:`csv_sink`, :func:`parquet_sink`): rows are
added batch by batch, in path order, and memory stays bounded whatever the row count.

Label Studio (``labelstudio``, :func:`write_labelstudio`; Label Studio 1.x "Import
pre-annotated data" / task format): a JSON list with one task per row,
``{"data": {"written_by": "fewshot-studio/labelstudio-1", "image": URL, <the row's fields>},
"predictions": [...]}``. ``image`` is a local-files URL ``/data/local-files/?d=PATH`` (PATH:
the row's path, URL-quoted, without a leading ``/``: relative paths need
``LOCAL_FILES_DOCUMENT_ROOT`` = the query folder, absolute ones ``/``). A row with a label has
one prediction ``{"model_version": ..., "score": confidence, "result": [{"from_name":
"choice", "to_name": "image", "type": "choices", "value": {"choices": [label]}}]}``; unknown
and error rows have none (``data.status`` and ``data.top1`` say why). The project's labeling
config must name its tags ``image`` and ``choice`` (README).

FiftyOne (``fiftyone``, :func:`write_fiftyone`; FiftyOne's ``FiftyOneImageClassificationDataset``
``labels.json``): ``{"format": "fewshot-studio/fiftyone-1", "classes": [...], "labels": {uuid:
target}}`` where ``uuid`` is the row's path without its extension (FiftyOne's key for the
file under ``data_path``) and ``target`` is ``{"label": class index, "confidence": c}``, or
``null`` for unknown and error rows. FiftyOne ignores the extra ``format`` key. Two files that
differ only by extension share a uuid: the first by path is written, the others left out.

Every writer refuses (UserError, before writing) an ``out`` that
:func:`~.output_files.check_output` refuses, and writes atomically.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fewshot_studio.engine.api import Prediction
from fewshot_studio.engine.label_rows import (
    CSV_COLUMNS,
    DUPLICATES_COLUMNS,
    FIFTYONE_FORMAT,
    JSON_FORMAT,
    LABELSTUDIO_FORMAT,
    csv_cell,
    csv_safe,
    csv_unsafe,
    display_path,
    row_values,
    sorted_predictions,
)
from fewshot_studio.engine.output_files import atomic_write, check_output
from fewshot_studio.errors import UserError
from fewshot_studio.io.atomic import atomic_path

LABELSTUDIO_IMAGE_URL = "/data/local-files/?d="
PARQUET_ROW_GROUP = 65536
PARQUET_NEEDS = 'the parquet format needs pyarrow: pip install "fewshot-studio[cluster]"'

RowSink = Callable[[Sequence[Prediction]], None]
"""Adds a batch of predictions (in path order, after the batches before) to a stream."""


@contextlib.contextmanager
def _user_errors(out: str | os.PathLike[str]) -> Iterator[None]:
    """An OSError while writing ``out`` is a UserError naming it."""
    try:
        yield
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror or e}") from None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def csv_sink(out: str | os.PathLike[str], root: Path,
             absolute_paths: bool = False) -> Iterator[RowSink]:
    """Stream the CSV into ``out``: the header, then each batch added; the file appears
    (atomically) when the block ends without an exception. Adds in path order."""
    with _user_errors(out), atomic_path(out) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(CSV_COLUMNS)

            def add(predictions: Sequence[Prediction]) -> None:
                for p in predictions:
                    row = row_values(p, root, absolute_paths)
                    w.writerow([csv_safe(c, csv_cell(row[c])) for c in CSV_COLUMNS])

            yield add
        _fsync(tmp)


def _pyarrow() -> tuple[Any, Any]:
    """``(pyarrow, pyarrow.parquet)``; UserError when pyarrow is not installed."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(PARQUET_NEEDS) from None
    return pa, pq


def parquet_schema() -> Any:
    """The Parquet file's ``pyarrow.Schema``: the CSV's columns, typed, with our format in
    the metadata."""
    pa, _ = _pyarrow()
    types = {"confidence": pa.float64(), "margin": pa.float64(), "corrected": pa.bool_(),
             **{f"top{k}_prob": pa.float64() for k in (1, 2, 3)}}
    return pa.schema([(c, types.get(c, pa.string())) for c in CSV_COLUMNS],
                     metadata={"format": JSON_FORMAT})


@contextlib.contextmanager
def parquet_sink(out: str | os.PathLike[str], root: Path, absolute_paths: bool = False,
                 row_group: int = PARQUET_ROW_GROUP) -> Iterator[RowSink]:
    """Stream the Parquet file into ``out`` by row groups of ``row_group`` rows (memory
    bounded by one row group); the file appears (atomically) when the block ends without
    an exception. Adds in path order."""
    pa, pq = _pyarrow()
    schema = parquet_schema()
    with _user_errors(out), atomic_path(out) as tmp:
        writer = pq.ParquetWriter(tmp, schema)
        rows: list[dict[str, Any]] = []

        def flush() -> None:
            writer.write_table(pa.Table.from_pylist(rows, schema=schema))
            rows.clear()

        def add(predictions: Sequence[Prediction]) -> None:
            for p in predictions:
                rows.append(row_values(p, root, absolute_paths))
                if len(rows) >= row_group:
                    flush()

        try:
            yield add
            if rows:
                flush()
        finally:
            writer.close()
        _fsync(tmp)


def write_csv(predictions: Sequence[Prediction], out: Path, root: Path,
              absolute_paths: bool = False) -> Path:
    """Write the CSV (see module docstring) atomically; returns ``out``."""
    preds = sorted_predictions(predictions)
    check_output(out, (p.path for p in preds))
    with csv_sink(out, root, absolute_paths) as add:
        add(preds)
    return Path(out)


def write_parquet(predictions: Sequence[Prediction], out: Path, root: Path,
                  absolute_paths: bool = False) -> Path:
    """Write the Parquet file (see module docstring) atomically; returns ``out``. UserError
    when pyarrow is not installed."""
    _pyarrow()
    preds = sorted_predictions(predictions)
    check_output(out, (p.path for p in preds))
    with parquet_sink(out, root, absolute_paths) as add:
        add(preds)
    return Path(out)


def read_parquet(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rows of a Parquet labels file as typed dicts (for tests and round-trips)."""
    _, pq = _pyarrow()
    return list(pq.read_table(path).to_pylist())


def write_json(predictions: Sequence[Prediction], out: Path, root: Path,
               absolute_paths: bool = False) -> Path:
    """Write the JSON (see module docstring) atomically; returns ``out``."""
    preds = sorted_predictions(predictions)
    check_output(out, (p.path for p in preds))

    def write(f: io.TextIOBase) -> None:
        doc = {
            "format": JSON_FORMAT,
            "root": str(Path(os.path.abspath(root))),
            "columns": list(CSV_COLUMNS),
            "rows": [row_values(p, root, absolute_paths) for p in preds],
        }
        json.dump(doc, f, ensure_ascii=False, indent=1, allow_nan=False)
        f.write("\n")

    return atomic_write(out, write)


def labelstudio_image_url(path: str) -> str:
    """A row's path as a Label Studio local-files URL (see the module docstring)."""
    return LABELSTUDIO_IMAGE_URL + quote(path.replace(os.sep, "/").lstrip("/"), safe="/")


def write_labelstudio(predictions: Sequence[Prediction], out: Path, root: Path,
                      absolute_paths: bool = False, model_version: str = "") -> Path:
    """Write Label Studio tasks with predictions (see the module docstring) atomically;
    returns ``out``. ``model_version``: the checkpoint's name."""
    preds = sorted_predictions(predictions)
    check_output(out, (p.path for p in preds))

    def task(p: Prediction) -> dict[str, Any]:
        row = row_values(p, root, absolute_paths)
        data = {"written_by": LABELSTUDIO_FORMAT, "image": labelstudio_image_url(row["path"]),
                **row}
        if row["label"] is None:
            return {"data": data, "predictions": []}
        result = {"from_name": "choice", "to_name": "image", "type": "choices",
                  "value": {"choices": [row["label"]]}}
        return {"data": data, "predictions": [
            {"model_version": model_version, "score": row["confidence"], "result": [result]}]}

    def write(f: io.TextIOBase) -> None:
        json.dump([task(p) for p in preds], f, ensure_ascii=False, indent=1, allow_nan=False)
        f.write("\n")

    return atomic_write(out, write)


def fiftyone_uuid(path: str) -> str:
    """FiftyOne's key of a file under its ``data_path``: the path without its extension."""
    return os.path.splitext(path)[0]


def write_fiftyone(predictions: Sequence[Prediction], out: Path, root: Path,
                   absolute_paths: bool = False, classes: Sequence[str] = ()) -> Path:
    """Write a FiftyOne ``labels.json`` (see the module docstring) atomically; returns
    ``out``. ``classes``: the run's classes in order (labels not in it are appended)."""
    preds = sorted_predictions(predictions)
    check_output(out, (p.path for p in preds))
    rows = [row_values(p, root, absolute_paths) for p in preds]
    names = list(dict.fromkeys([*classes, *(r["label"] for r in rows if r["label"] is not None)]))
    index = {name: i for i, name in enumerate(names)}
    labels: dict[str, Any] = {}
    for r in rows:
        uuid = fiftyone_uuid(r["path"])
        if uuid not in labels:
            labels[uuid] = None if r["label"] is None else {
                "label": index[r["label"]], "confidence": r["confidence"]}

    def write(f: io.TextIOBase) -> None:
        doc = {"format": FIFTYONE_FORMAT, "classes": names, "labels": labels}
        json.dump(doc, f, ensure_ascii=False, indent=1, allow_nan=False)
        f.write("\n")

    return atomic_write(out, write)


def write_duplicates_csv(rows: Iterable[tuple[int, Path, float]], out: Path, root: Path,
                         absolute_paths: bool = False, inputs: Iterable[Path] = ()) -> Path:
    """Write ``fewshot-studio duplicates``' CSV, columns
    :data:`~.label_rows.DUPLICATES_COLUMNS`, one line per ``(group, path, similarity)``
    (paths as in the labels CSV, spreadsheet-safe; similarity with 6 decimals) atomically;
    returns ``out`` (``inputs``: the images read, see :func:`~.output_files.check_output`)."""
    check_output(out, inputs)
    lines = [(g, display_path(p, root, absolute_paths), s) for g, p, s in rows]

    def write(f: io.TextIOBase) -> None:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(DUPLICATES_COLUMNS)
        for g, path, sim in lines:
            w.writerow([g, csv_safe("path", path), f"{sim:.6f}"])

    return atomic_write(out, write)


def read_csv(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """The rows of a labels CSV as dicts of strings, spreadsheet escapes undone (for tests
    and round-trips)."""
    with open(path, encoding="utf-8", newline="") as f:
        return [{k: csv_unsafe(k, v) if isinstance(v, str) else v for k, v in row.items()}
                for row in csv.DictReader(f)]


def read_labels_csv(path: str | os.PathLike[str], root: Path) -> list[tuple[Path, str]]:
    """``(absolute path, label)`` pairs of a labels CSV (``label --labels``): UTF-8 (a BOM is
    fine), a header row naming a ``path`` and a ``label`` column (any others are ignored; a
    file without such a header is read as ``path,label`` rows). Relative paths are relative
    to ``root``; rows with an empty label are left out. Our own labels CSV reads back with
    its spreadsheet escapes undone (:func:`read_csv`). UserError when it cannot be read."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            rows = list(csv.reader(f))
    except FileNotFoundError:
        raise UserError(f"--labels file not found: {path}") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise UserError(f"cannot read --labels file {path}: {reason}") from None
    if not rows:
        return []
    header = [c.strip().lower() for c in rows[0]]
    ours = tuple(rows[0]) == CSV_COLUMNS
    first = 1
    if "path" in header and "label" in header:
        ip, il = header.index("path"), header.index("label")
        rows, first = rows[1:], 2
    else:
        ip, il = 0, 1
    pairs: list[tuple[Path, str]] = []
    for n, row in enumerate(rows, first):
        if not any(c.strip() for c in row):
            continue
        if len(row) <= max(ip, il):
            raise UserError(f"--labels file {path}, line {n}: expected path and label columns")
        where, label = row[ip], row[il]
        if ours:
            where, label = csv_unsafe("path", where), csv_unsafe("label", label)
        if not label.strip() or not where:
            continue
        pairs.append((Path(os.path.abspath(Path(root) / where)), label))
    return pairs


@dataclass
class KnownLabels:
    """What a labels source says, split by where each image is: ``corrections`` (query
    images -> label, keyed by the caller's own query paths), ``examples`` (label -> other
    existing images), ``missing`` (files that are not there) and ``labels`` (every label it
    names)."""

    source: Path
    corrections: dict[Path, str] = field(default_factory=dict)
    examples: dict[str, list[Path]] = field(default_factory=dict)
    missing: list[Path] = field(default_factory=list)
    labels: set[str] = field(default_factory=set)


def read_known_labels(source: str | os.PathLike[str], root: Path, queries: Collection[Path],
                      what: str = "labels") -> KnownLabels:
    """Known labels (``label --labels``, the app's File > Import labels): a path,label CSV
    (:func:`read_labels_csv`, relative paths against ``root``) or a folder of class
    sub-folders (:func:`~fewshot_studio.data.scan.class_folders`), split against
    ``queries`` (the query images): a query image is a correction, any other existing image
    an example, a missing file is counted. UserError (naming ``what``) when the source is
    not there, cannot be read or holds no labels. One stat per non-query image."""
    from fewshot_studio.data.scan import class_folders  # not at import: it loads PIL (--help)

    source = Path(source)
    if source.is_dir():
        pairs = [(p, name) for name, images in class_folders(source, what=f"{what} folder")
                 .items() for p in images]
        if not pairs:
            raise UserError(f"{what} {source}: no class sub-folders with images")
    elif source.exists():
        pairs = read_labels_csv(source, root)
        if not pairs:
            raise UserError(f"{what} {source}: no labels in it (a path,label CSV or a folder "
                            "of class folders)")
    else:
        raise UserError(f"{what} not found: {source}")
    query_of = {os.path.abspath(q): q for q in queries}
    found = KnownLabels(source, labels={label for _, label in pairs})
    for path, label in pairs:
        path = Path(os.path.abspath(path))
        if (q := query_of.get(str(path))) is not None:
            found.corrections[q] = label
        elif path.is_file():
            found.examples.setdefault(label, []).append(path)
        else:
            found.missing.append(path)
    return found
