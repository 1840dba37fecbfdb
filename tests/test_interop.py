"""Label Studio and FiftyOne exports (``label --format labelstudio|fiftyone``), each checked
against the schema the tool documents, written out below as an explicit structure check.

* Label Studio 1.x, "Import pre-annotated data" and "Task format" (labelstud.io/guide/
  predictions, /guide/task_format): the import file is a JSON list of tasks; a task has
  ``data`` (the keys the labeling config's ``$variables`` read: ``$image``) and
  ``predictions``, a list of ``{"model_version": str, "score": number, "result": [region]}``
  where a choices region is ``{"from_name": <Choices name>, "to_name": <Image name>,
  "type": "choices", "value": {"choices": [label]}}``.
* FiftyOne ``FiftyOneImageClassificationDataset`` (docs.voxel51.com, "Loading datasets from
  disk"; the importer in ``fiftyone/utils/data/importers.py`` since 0.7, unchanged in 1.x):
  ``labels.json`` is ``{"classes": [str, ...], "labels": {uuid: target}}``, ``uuid`` the
  media path relative to ``data_path`` without its extension, ``target`` a class index (with
  ``classes``), a label string, ``null`` (unlabeled) or ``{"label": target, "confidence":
  number}``. Other top-level keys are ignored.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
from engine_fixtures import make_checkpoint, make_label_folders, sample_predictions

from fewshot_studio.cli import main
from fewshot_studio.engine import export
from fewshot_studio.errors import UserError

# The labeling config a Label Studio project needs for our predictions (README).
LABEL_CONFIG_NAMES = {"from_name": "choice", "to_name": "image"}


def check_labelstudio_tasks(doc: Any, classes: set[str]) -> None:
    """Label Studio's task import format with predictions (see the module docstring)."""
    assert isinstance(doc, list)
    for task in doc:
        assert isinstance(task, dict) and set(task) <= {"data", "predictions"}
        data = task["data"]
        assert isinstance(data, dict) and isinstance(data["image"], str)
        assert all(v is None or isinstance(v, str | int | float | bool) for v in data.values())
        preds = task.get("predictions", [])
        assert isinstance(preds, list)
        for p in preds:
            assert set(p) == {"model_version", "score", "result"}
            assert isinstance(p["model_version"], str)
            assert isinstance(p["score"], int | float) and 0.0 <= p["score"] <= 1.0
            assert isinstance(p["result"], list) and p["result"]
            for region in p["result"]:
                assert set(region) == {"from_name", "to_name", "type", "value"}
                assert {k: region[k] for k in LABEL_CONFIG_NAMES} == LABEL_CONFIG_NAMES
                assert region["type"] == "choices"
                assert set(region["value"]) == {"choices"}
                choices = region["value"]["choices"]
                assert isinstance(choices, list) and len(choices) == 1
                assert choices[0] in classes


def check_fiftyone_labels(doc: Any) -> None:
    """FiftyOne's ``FiftyOneImageClassificationDataset`` labels.json (module docstring)."""
    assert isinstance(doc, dict)
    classes, labels = doc["classes"], doc["labels"]
    assert isinstance(classes, list) and all(isinstance(c, str) for c in classes)
    assert len(set(classes)) == len(classes)
    assert isinstance(labels, dict)
    for uuid, target in labels.items():
        assert isinstance(uuid, str) and uuid and not os.path.splitext(uuid)[1]
        if isinstance(target, dict):
            assert set(target) <= {"label", "confidence", "attributes"}
            conf = target.get("confidence")
            assert conf is None or isinstance(conf, int | float)
            target = target["label"]
        assert target is None or isinstance(target, str) or (
            isinstance(target, int) and 0 <= target < len(classes))


def fiftyone_media_map(data_path: Path) -> dict[str, Path]:
    """What FiftyOne's importer matches uuids against (``_load_data_map(data_path,
    ignore_exts=True, recursive=True)``): every file's path relative to ``data_path``,
    without its extension."""
    return {os.path.splitext(p.relative_to(data_path).as_posix())[0]: p
            for p in data_path.rglob("*") if p.is_file()}



def test_labelstudio_tasks(tmp_path: Path) -> None:
    """One task per row (sorted by path); labeled rows carry one choices prediction with the
    confidence as score; unknown and error rows none; the image is a local-files URL; every
    CSV field is in ``data``."""
    root = tmp_path / "q"
    out = export.write_labelstudio(sample_predictions(root), tmp_path / "ls.json", root,
                                   model_version="natural-protonet")
    doc = json.loads(out.read_text(encoding="utf-8"))
    check_labelstudio_tasks(doc, {"cat", "dog", "bird"})
    assert [t["data"]["path"] for t in doc] == ["a/ünï 图.png", "b.jpg", "c.jpg", "z.jpg"]
    unknown, err, corrected, ok = doc
    assert unknown["predictions"] == [] and unknown["data"]["status"] == "unknown"
    assert unknown["data"]["top1"] == "dog"
    assert err["predictions"] == [] and err["data"]["error"] == "truncated file"
    assert ok["predictions"] == [{"model_version": "natural-protonet", "score": 0.7, "result": [
        {"from_name": "choice", "to_name": "image", "type": "choices",
         "value": {"choices": ["cat"]}}]}]
    assert corrected["data"]["corrected"] is True
    assert set(export.CSV_COLUMNS) <= set(ok["data"])
    url = unknown["data"]["image"]
    assert url.startswith("/data/local-files/?d=") and " " not in url
    assert unquote(url.split("?d=", 1)[1]) == "a/ünï 图.png"
    absolute = json.loads(export.write_labelstudio(
        sample_predictions(root), tmp_path / "abs.json", root,
        absolute_paths=True).read_text("utf-8"))
    assert unquote(absolute[3]["data"]["image"].split("?d=", 1)[1]) == str(
        root / "z.jpg").lstrip("/")


def test_fiftyone_labels(tmp_path: Path) -> None:
    """classes in the run's order (labels outside it appended); uuids match FiftyOne's media
    map of the query folder; targets are class indices with the confidence, null for
    unknown and error rows."""
    root = tmp_path / "q"
    for p in sample_predictions(root):
        p.path.parent.mkdir(parents=True, exist_ok=True)
        p.path.write_bytes(b"x")
    out = export.write_fiftyone(sample_predictions(root), tmp_path / "labels.json", root,
                                classes=["dog", "bird"])
    doc = json.loads(out.read_text(encoding="utf-8"))
    check_fiftyone_labels(doc)
    assert doc["classes"] == ["dog", "bird", "cat"]
    assert doc["labels"] == {"a/ünï 图": None, "b": None,
                             "c": {"label": 0, "confidence": 1.0},
                             "z": {"label": 2, "confidence": 0.7}}
    media = fiftyone_media_map(root)
    assert set(doc["labels"]) == set(media)


def test_new_formats_replace_only_their_own_files(tmp_path: Path) -> None:
    """Both new files are recognised as ours (and can be replaced by any format); someone
    else's JSON list or object is refused; an empty list can be replaced."""
    root = tmp_path / "q"
    for name, write in (("ls.json", export.write_labelstudio),
                        ("fo.json", export.write_fiftyone)):
        out = write(sample_predictions(root), tmp_path / name, root)
        assert export.is_labels_file(out)
        assert write(sample_predictions(root)[:1], out, root) == out
        assert export.write_csv(sample_predictions(root), out, root) == out
    theirs = tmp_path / "tasks.json"
    for text in ('[{"data": {"image": "x.jpg"}}]\n', '{"classes": [], "labels": {}}\n'):
        theirs.write_text(text)
        for write in (export.write_labelstudio, export.write_fiftyone):
            with pytest.raises(UserError, match="will not overwrite"):
                write(sample_predictions(root), theirs, root)
        assert theirs.read_text() == text
    empty = tmp_path / "empty.json"
    empty.write_text("[]\n")
    assert export.write_labelstudio(sample_predictions(root), empty, root) == empty


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("interop")
    ckpt = make_checkpoint(root / "tiny.safetensors")
    support, query, truth, bad = make_label_folders(root)
    return {"ckpt": ckpt, "support": support, "query": query, "truth": truth, "bad": bad,
            "cache": root / "cache.sqlite"}


@pytest.mark.parametrize("fmt", ["labelstudio", "fiftyone"])
def test_label_command_writes_the_format(env: dict, tmp_path: Path, fmt: str) -> None:
    """``label --format`` writes a file that passes the tool's structure check, one entry per
    query file (FiftyOne: per uuid), the classes being the support folders."""
    out = tmp_path / "out.json"
    assert main(["label", "--checkpoint", str(env["ckpt"]), "--support", str(env["support"]),
                 "--query", str(env["query"]), "--out", str(out), "--cache", str(env["cache"]),
                 "--format", fmt]) == 0
    doc = json.loads(out.read_text(encoding="utf-8"))
    classes = sorted(os.listdir(env["support"]))
    csv_out = tmp_path / "out.csv"
    assert main(["label", "--checkpoint", str(env["ckpt"]), "--support", str(env["support"]),
                 "--query", str(env["query"]), "--out", str(csv_out),
                 "--cache", str(env["cache"])]) == 0
    rows = export.read_csv(csv_out)
    if fmt == "labelstudio":
        check_labelstudio_tasks(doc, set(classes))
        assert [t["data"]["path"] for t in doc] == [r["path"] for r in rows]
        assert all(bool(t["predictions"]) == bool(r["label"])
                   for t, r in zip(doc, rows, strict=True))
        assert {p["model_version"] for t in doc for p in t["predictions"]} <= {"tiny"}
    else:
        check_fiftyone_labels(doc)
        assert doc["classes"] == classes
        assert set(doc["labels"]) == {os.path.splitext(r["path"])[0] for r in rows}
        media = fiftyone_media_map(env["query"])
        assert set(doc["labels"]) <= set(media)


def test_label_command_writes_parquet_that_pandas_reads(env: dict, tmp_path: Path) -> None:
    """``label --out x.parquet`` (the format from the suffix): a Parquet file another tool
    (pandas, over pyarrow) reads as the CSV's table, typed: the same paths and labels,
    confidences as numbers, errors as nulls."""
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    outs = {}
    for suffix in (".parquet", ".csv"):
        outs[suffix] = tmp_path / f"out{suffix}"
        assert main(["label", "--checkpoint", str(env["ckpt"]), "--support",
                     str(env["support"]), "--query", str(env["query"]), "--out",
                     str(outs[suffix]), "--cache", str(env["cache"])]) == 0
    table = pd.read_parquet(outs[".parquet"])
    rows = export.read_csv(outs[".csv"])
    assert list(table.columns) == list(export.CSV_COLUMNS)
    assert table["path"].tolist() == [r["path"] for r in rows]
    assert [lab if isinstance(lab, str) else "" for lab in table["label"]] == [
        r["label"] for r in rows]
    assert str(table["confidence"].dtype) == "float64"
    errors = table["status"] == "error"
    assert errors.any() and table.loc[errors, "confidence"].isna().all()
    assert bool(table["corrected"].dtype == bool)
