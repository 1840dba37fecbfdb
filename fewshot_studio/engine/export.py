"""Exports of a labeling run: CSV and JSON (written atomically), and copying or moving the
query images into one folder per class.

CSV (UTF-8, a header, one row per query file sorted by path), columns :data:`CSV_COLUMNS`:
``path`` (relative to the query root with ``/`` separators, or absolute), ``label`` (empty
for unknown and error), ``confidence`` and ``margin`` (6 decimals; empty for errors),
``status`` (ok | unknown | error), ``error`` (the reason), ``top1``..``top3`` with
``top1_prob``..``top3_prob``, ``corrected`` (true | false).

JSON: ``{"format": "fewshot-studio/labels-1", "root": ..., "columns": [...], "rows": [...]}``
where each row has the CSV's fields with JSON types (numbers, null, booleans). It never holds
``NaN`` or ``Infinity``: a prediction with a non-finite confidence, margin or probability is
written as an error row ("model produced non-finite values"), in the CSV too.

Spreadsheet safety (CSV only; the JSON is written as is): a cell that starts with ``=``,
``+``, ``-``, ``@``, a tab or a carriage return is run as a formula by spreadsheets. So a
relative ``path`` that starts with one of them gets a ``./`` prefix (the same path for any
program), and a text cell (``label``, ``error``, ``top1``..``top3``) that starts with one of
them, or with an apostrophe, gets a leading apostrophe ``'`` (spreadsheets show the text
without it). :func:`read_csv` undoes both, so a round trip gives the original values.

Output files: :func:`check_output` refuses (UserError, before any work) an ``out`` that is one
of the input images or any existing file that is not an output this program wrote (our labels
or duplicates CSV header line, our JSON ``format``, our Label Studio ``written_by``, or an
empty JSON list); a previous output file is replaced.

Class folders (:func:`class_folders`): a class goes into ``dest/<name>/`` when its name is
already a safe folder name (see :func:`safe_folder_name`), is not ``_unknown`` and no other
class of the run has the same name ignoring case; otherwise into
``dest/<safe name>-<8 hex digits>/``, the digits being the start of the SHA-1 of the UTF-8
class name (longer if that still collided). So ``x_y`` goes to ``x_y/`` and ``x:y`` to
``x_y-<hash>/``, a class named ``_unknown`` never mixes with the unknown images
(``dest/_unknown/``), and the same classes always give the same folders.

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

Format table: :data:`EXPORT_FORMATS` (name -> :class:`ExportFormat`) is the one list of label
file formats: the CLI's ``--format`` choices and :func:`format_for` read it.

Copies claim their target name atomically (exclusive create, or a hard link for a move), so
two runs into one folder never overwrite each other's files; a name that exists gets ``_1``,
``_2``... before the suffix. A failed copy removes the partial file it created.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import io
import json
import math
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO, Protocol
from urllib.parse import quote

from fewshot_studio.engine.api import Prediction, Status
from fewshot_studio.errors import UserError
from fewshot_studio.io.atomic import atomic_write_text
from fewshot_studio.progress import Progress

CSV_COLUMNS = ("path", "label", "confidence", "margin", "status", "error",
               "top1", "top1_prob", "top2", "top2_prob", "top3", "top3_prob", "corrected")
JSON_FORMAT = "fewshot-studio/labels-1"
FIFTYONE_FORMAT = "fewshot-studio/fiftyone-1"
LABELSTUDIO_FORMAT = "fewshot-studio/labelstudio-1"
DUPLICATES_COLUMNS = ("group", "path", "similarity")  # ``fewshot-studio duplicates``
LABELSTUDIO_IMAGE_URL = "/data/local-files/?d="
UNKNOWN_FOLDER = "_unknown"
NON_FINITE_ERROR = "model produced non-finite values"

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_TEXT_COLUMNS = ("label", "error", "top1", "top2", "top3")
_SNIFF_BYTES = 4096
_OUR_CSV_HEADERS = (",".join(CSV_COLUMNS), ",".join(DUPLICATES_COLUMNS))
_JSON_HEAD = re.compile(r'\A\ufeff?\s*\{\s*"format"\s*:\s*"(?:'
                        + "|".join(map(re.escape, (JSON_FORMAT, FIFTYONE_FORMAT))) + ')"')
_LABELSTUDIO_HEAD = re.compile(r'\A\ufeff?\s*\[\s*(?:\]\s*\Z|\{\s*"data"\s*:\s*\{\s*'
                               r'"written_by"\s*:\s*"' + re.escape(LABELSTUDIO_FORMAT) + '")')


def display_path(path: Path, root: Path, absolute_paths: bool = False) -> str:
    """``path`` relative to ``root`` (posix separators), or absolute when asked or when it
    is not under ``root``."""
    path = Path(os.path.abspath(path))
    if not absolute_paths:
        try:
            return path.relative_to(Path(os.path.abspath(root))).as_posix()
        except ValueError:
            pass
    return str(path)


def checked(p: Prediction) -> Prediction:
    """``p``, or an error prediction when it holds a non-finite number (a broken model)."""
    if p.status == Status.ERROR:
        return p
    numbers = [p.confidence, p.margin, *(prob for _, prob in p.top)]
    if all(math.isfinite(float(v)) for v in numbers):
        return p
    return replace(p, label=None, confidence=0.0, margin=0.0, status=Status.ERROR, top=(),
                   error=NON_FINITE_ERROR, corrected=False)


def row_values(p: Prediction, root: Path, absolute_paths: bool = False) -> dict[str, Any]:
    """One prediction as typed values keyed by :data:`CSV_COLUMNS` (non-finite numbers make
    it an error row, see :func:`checked`)."""
    p = checked(p)
    err = p.status == Status.ERROR
    row: dict[str, Any] = {
        "path": display_path(p.path, root, absolute_paths),
        "label": p.label,
        "confidence": None if err else round(float(p.confidence), 6),
        "margin": None if err else round(float(p.margin), 6),
        "status": p.status.value,
        "error": p.error,
    }
    for k in range(3):
        name, prob = p.top[k] if k < len(p.top) else (None, None)
        row[f"top{k + 1}"] = name
        row[f"top{k + 1}_prob"] = None if prob is None else round(float(prob), 6)
    row["corrected"] = bool(p.corrected)
    return row


def _csv_cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:.6f}"
    return str(v)


def _csv_safe(column: str, cell: str) -> str:
    """Spreadsheet-safe form of one CSV cell (see the module docstring)."""
    if column == "path" and cell.startswith(_FORMULA_START):
        return "./" + cell
    if column in _TEXT_COLUMNS and cell.startswith((*_FORMULA_START, "'")):
        return "'" + cell
    return cell


def _csv_unsafe(column: str, cell: str) -> str:
    """Undo :func:`_csv_safe`."""
    if column == "path" and cell.startswith("./") and cell[2:].startswith(_FORMULA_START):
        return cell[2:]
    if column in _TEXT_COLUMNS and cell.startswith("'"):
        return cell[1:]
    return cell


def _sorted(predictions: Sequence[Prediction]) -> list[Prediction]:
    return sorted(predictions, key=lambda p: Path(p.path))


def atomic_write(out: str | os.PathLike[str], write: Callable[[io.TextIOBase], None]) -> Path:
    """Write a UTF-8 text file through ``write(f)`` atomically (:mod:`fewshot_studio.io.atomic`);
    an output that cannot be created is a UserError."""
    try:
        return atomic_write_text(out, write)
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror or e}") from None


def ensure_writable(out: str | os.PathLike[str]) -> Path:
    """Check, before any work, that ``out`` can be written (its folder exists and accepts a
    new file; ``out`` is not a folder). Raises UserError with a one-line reason."""
    out = Path(out)
    parent = out.parent if str(out.parent) else Path(".")
    if out.is_dir():
        raise UserError(f"output path is a folder: {out}")
    if not parent.is_dir():
        raise UserError(f"output folder does not exist: {parent}")
    try:
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{out.name}.", suffix=".probe")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise UserError(f"cannot write to {parent}: {e.strerror or e}") from None
    if out.exists() and not os.access(out, os.W_OK):
        raise UserError(f"output file is not writable: {out}")
    return out


def is_labels_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a regular file that starts like an output file this program writes
    (see the module docstring: labels or duplicates CSV, JSON, FiftyOne, Label Studio). Reads
    at most 4 KiB."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO never blocks
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        head = os.read(fd, _SNIFF_BYTES).decode("utf-8", errors="replace")
    except OSError:
        return False
    finally:
        os.close(fd)
    first = head.removeprefix("\ufeff").split("\n", 1)[0].rstrip("\r")
    return (first in _OUR_CSV_HEADERS or _JSON_HEAD.match(head) is not None
            or _LABELSTUDIO_HEAD.match(head) is not None)


def check_output(out: str | os.PathLike[str], inputs: Iterable[Path] = ()) -> Path:
    """Check, before any work, that the labels file ``out`` may be written: it can be created
    (:func:`ensure_writable`) and, if it exists, it is a regular file, not one of ``inputs``
    (the images read) and a labels file this program wrote. Raises UserError naming it."""
    out = Path(out)
    try:
        st = os.stat(out)
    except FileNotFoundError:
        return ensure_writable(out)
    except OSError as e:
        raise UserError(f"cannot check output file {out}: {e.strerror or e}") from None
    if stat.S_ISDIR(st.st_mode):
        raise UserError(f"output path is a folder: {out}")
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"output path is not a regular file, will not replace it: {out}")
    real = os.path.realpath(out)
    for p in inputs:
        # only same-named files are compared by inode (a hard link under another name is
        # still refused below: an image is not a labels file)
        if p.name in (out.name, os.path.basename(real)):
            with contextlib.suppress(OSError):
                if os.path.samefile(p, out):
                    raise UserError(f"output file is one of the input images: {out}")
    if not is_labels_file(out):
        raise UserError(f"output file exists and is not a labels file written by "
                        f"fewshot-studio, will not overwrite it: {out}")
    return ensure_writable(out)


def write_csv(predictions: Sequence[Prediction], out: Path, root: Path,
              absolute_paths: bool = False) -> Path:
    """Write the CSV (see module docstring) atomically; returns ``out``. Refuses (UserError)
    an ``out`` that :func:`check_output` refuses."""
    preds = _sorted(predictions)
    check_output(out, (p.path for p in preds))

    def write(f: io.TextIOBase) -> None:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(CSV_COLUMNS)
        for p in preds:
            row = row_values(p, root, absolute_paths)
            w.writerow([_csv_safe(c, _csv_cell(row[c])) for c in CSV_COLUMNS])

    return atomic_write(out, write)


def write_json(predictions: Sequence[Prediction], out: Path, root: Path,
               absolute_paths: bool = False) -> Path:
    """Write the JSON (see module docstring) atomically; returns ``out``. Refuses (UserError)
    an ``out`` that :func:`check_output` refuses."""
    preds = _sorted(predictions)
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
    returns ``out``. ``model_version``: the checkpoint's name. Refuses (UserError) an ``out``
    that :func:`check_output` refuses."""
    preds = _sorted(predictions)
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
    ``out``. ``classes``: the run's classes in order (labels not in it are appended).
    Refuses (UserError) an ``out`` that :func:`check_output` refuses."""
    preds = _sorted(predictions)
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
    """Write ``fewshot-studio duplicates``' CSV, columns :data:`DUPLICATES_COLUMNS`, one line
    per ``(group, path, similarity)`` (paths as in the labels CSV, spreadsheet-safe;
    similarity with 6 decimals) atomically; returns ``out``. Refuses (UserError) an ``out``
    that :func:`check_output` refuses (``inputs``: the images read)."""
    check_output(out, inputs)
    lines = [(g, display_path(p, root, absolute_paths), s) for g, p, s in rows]

    def write(f: io.TextIOBase) -> None:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(DUPLICATES_COLUMNS)
        for g, path, sim in lines:
            w.writerow([g, _csv_safe("path", path), f"{sim:.6f}"])

    return atomic_write(out, write)


class LabelsWriter(Protocol):
    """What :attr:`ExportFormat.write` is called as."""

    def __call__(self, predictions: Sequence[Prediction], out: Path, root: Path, *,
                 absolute_paths: bool = False, classes: Sequence[str] = (),
                 model_version: str = "") -> Path: ...


@dataclass(frozen=True)
class ExportFormat:
    """A label file format: ``name`` (``--format``), the usual ``suffix``, ``title`` for file
    dialogs (``"CSV (*.csv)"``), ``help`` (one line) and ``write`` (a :class:`LabelsWriter`;
    ``classes`` and ``model_version`` are used by the formats that store them)."""

    name: str
    suffix: str
    title: str
    help: str
    write: LabelsWriter


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


EXPORT_FORMATS: dict[str, ExportFormat] = {f.name: f for f in (
    ExportFormat("csv", ".csv", "CSV (*.csv)", "one row per image", _csv_writer),
    ExportFormat("json", ".json", "JSON (*.json)", "the CSV's rows as JSON", _json_writer),
    ExportFormat("labelstudio", ".json", "Label Studio tasks (*.json)",
                 "Label Studio task import with predictions", _labelstudio_writer),
    ExportFormat("fiftyone", ".json", "FiftyOne labels.json (*.json)",
                 "FiftyOne image classification labels.json", _fiftyone_writer),
)}
"""The label file formats, in menu order (see the module docstring for each)."""


def format_for(out: str | os.PathLike[str], name: str | None = None) -> ExportFormat:
    """The format ``name`` (UserError for an unknown one), or when None the one the suffix of
    ``out`` names: ``.json`` -> json, anything else -> csv."""
    if name is None:
        return EXPORT_FORMATS["json" if Path(out).suffix.lower() == ".json" else "csv"]
    try:
        return EXPORT_FORMATS[name]
    except KeyError:
        raise UserError(f"unknown format {name!r} (formats: "
                        f"{', '.join(EXPORT_FORMATS)})") from None


def read_csv(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """The rows of a labels CSV as dicts of strings, spreadsheet escapes undone (for tests
    and round-trips)."""
    with open(path, encoding="utf-8", newline="") as f:
        return [{k: _csv_unsafe(k, v) if isinstance(v, str) else v for k, v in row.items()}
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
            where, label = _csv_unsafe("path", where), _csv_unsafe("label", label)
        if not label.strip() or not where:
            continue
        pairs.append((Path(os.path.abspath(Path(root) / where)), label))
    return pairs


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
    preds = [checked(p) for p in _sorted(predictions)]
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
