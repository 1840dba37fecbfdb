"""`fewshot-studio label`, `checkpoints` and `export-onnx` from the command line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from engine_fixtures import make_checkpoint, make_label_folders, odd_names

from fewshot_studio.cli import main
from fewshot_studio.engine.export import CSV_COLUMNS, read_csv


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("cli")
    ckpt = make_checkpoint(root / "tiny.safetensors")
    support, query, truth, bad = make_label_folders(root)
    return {"root": root, "ckpt": ckpt, "support": support, "query": query, "truth": truth,
            "bad": bad, "cache": root / "cache.sqlite"}


def _label(env: dict, out: Path, *extra: str) -> int:
    return main(["label", "--checkpoint", str(env["ckpt"]), "--support", str(env["support"]),
                 "--query", str(env["query"]), "--out", str(out), "--cache", str(env["cache"]),
                 "--unknown-threshold", "0", *extra])


def test_label_writes_one_row_per_file(env: dict, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "labels.csv"
    assert _label(env, out, "--copy-to", str(tmp_path / "sorted"), "--device", "cpu") == 0
    stdout = capsys.readouterr().out
    rows = read_csv(out)
    assert list(rows[0]) == list(CSV_COLUMNS)
    paths = [r["path"] for r in rows]
    expected = set(env["truth"]) | set(env["bad"]) | set(odd_names())
    assert sorted(paths) == sorted(expected) and len(paths) == len(expected)
    by = {r["path"]: r for r in rows}
    for rel, reason in env["bad"].items():
        assert by[rel]["status"] == "error" and reason in by[rel]["error"]
    for rel, cls in env["truth"].items():
        assert by[rel]["status"] == "ok" and by[rel]["label"] == cls
    n_good = len(expected) - len(env["bad"])
    assert f"labeled {n_good}, unknown 0, errors {len(env['bad'])}" in stdout
    assert "images/s" in stdout and "backend onnxruntime (CPU)" in stdout
    copied = {p.relative_to(tmp_path / "sorted").parts[0]
              for p in (tmp_path / "sorted").rglob("*") if p.is_file()}
    assert copied == {"red", "green", "blue"}
    # second run: everything from the cache; JSON by suffix; absolute paths
    assert _label(env, tmp_path / "labels.json", "--absolute-paths") == 0
    assert "embedded 0," in capsys.readouterr().out
    doc = json.loads((tmp_path / "labels.json").read_text(encoding="utf-8"))
    assert [r["path"] for r in doc["rows"]] == [str(env["query"] / p) for p in paths]


def test_save_project_holds_every_prediction(env: dict, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """``--save-project``: the classes with their examples, the query folder, the checkpoint,
    the settings and one prediction per CSV row, the checkpoint's identity with them; written
    by the app's own writer (``project_io.save_project``); only the project file is created
    in its folder."""
    import hashlib

    from fewshot_studio.gui import project_io as pio

    out, proj = tmp_path / "l.csv", tmp_path / "review" / "batch.fsproj"
    (tmp_path / "review").mkdir()
    assert _label(env, out, "--save-project", str(proj), "--copy-to", str(tmp_path / "c")) == 0
    assert f"project {proj}" in capsys.readouterr().out
    assert os.listdir(tmp_path / "review") == ["batch.fsproj"]
    p = pio.load_project(proj)
    assert [c.name for c in p.classes] == sorted(os.listdir(env["support"]))
    assert p.classes[0].examples and all(e.is_file() for c in p.classes for e in c.examples)
    assert p.query_folder == env["query"].resolve()
    assert p.checkpoint == str(env["ckpt"].resolve())
    assert p.settings.unknown_threshold == 0.0
    saved = p.predictions
    assert saved is not None
    assert saved.checkpoint_id == hashlib.sha256(env["ckpt"].read_bytes()).hexdigest()
    # the features' cache key too: the app's map reads them without a run
    assert saved.feature_id.startswith(saved.checkpoint_id + ":")
    rows = {r["path"]: r for r in read_csv(out)}
    got = {pr.path.relative_to(env["query"].resolve()).as_posix(): pr for pr in saved.predictions}
    assert set(got) == set(rows)
    for rel, r in rows.items():
        assert (got[rel].label or "", str(got[rel].status)) == (r["label"], r["status"])
    assert saved.stamps[0] == pio.file_stamp(saved.predictions[0].path)


def test_threshold_and_no_recursive(env: dict, tmp_path: Path) -> None:
    out = tmp_path / "l.csv"
    assert _label(env, out, "--no-recursive", "--unknown-threshold", "0.99",
                  "--format", "csv", "--device", "cpu") == 0
    rows = read_csv(out)
    assert all("/" not in r["path"] for r in rows)
    assert {r["status"] for r in rows} == {"unknown", "error"}


@pytest.mark.parametrize("case", ["one_class", "empty_class", "missing_query",
                                  "missing_support", "unwritable_out", "out_is_dir",
                                  "bad_checkpoint", "unreadable_class", "no_cuda",
                                  "project_with_move", "project_over_other_file"])
def test_bad_input_is_one_line_exit_2(env: dict, tmp_path: Path, case: str,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    support, query, out = env["support"], env["query"], tmp_path / "l.csv"
    ckpt = str(env["ckpt"])
    extra: list[str] = []
    if case == "one_class":
        support = tmp_path / "s"
        (support / "only").mkdir(parents=True)
        (support / "only" / "a.png").write_bytes((env["support"] / "red" / "0.png").read_bytes())
        match = "at least 2 classes"
    elif case == "empty_class":
        support = tmp_path / "s"
        for c in ("red", "none"):
            (support / c).mkdir(parents=True)
        (support / "red" / "a.png").write_bytes((env["support"] / "red" / "0.png").read_bytes())
        (support / "none" / "readme.txt").write_text("no images")
        match = "'none' has no image files"
    elif case == "unreadable_class":
        support = tmp_path / "s"
        for c in ("red", "junk"):
            (support / c).mkdir(parents=True)
        (support / "red" / "a.png").write_bytes((env["support"] / "red" / "0.png").read_bytes())
        (support / "junk" / "a.jpg").write_bytes(b"")
        match = "'junk' has no readable"
    elif case == "missing_query":
        query = tmp_path / "nope"
        match = "query folder not found"
    elif case == "missing_support":
        support = tmp_path / "nope"
        match = "support folder not found"
    elif case == "unwritable_out":
        out = tmp_path / "no" / "such" / "l.csv"
        match = "does not exist"
    elif case == "out_is_dir":
        out = tmp_path
        match = "is a folder"
    elif case == "no_cuda":
        from fewshot_studio.engine.backends import onnxruntime_providers, torch_cuda_works

        if torch_cuda_works() or "CUDAExecutionProvider" in onnxruntime_providers():
            pytest.skip("CUDA works here")
        extra = ["--device", "cuda"]
        match = "no working CUDA"
    elif case == "project_with_move":
        extra = ["--save-project", str(tmp_path / "p.fsproj"), "--move-to", str(tmp_path / "m")]
        match = "--save-project cannot be used with --move-to"
    elif case == "project_over_other_file":
        (tmp_path / "notes.fsproj").write_text("my notes")
        extra = ["--save-project", str(tmp_path / "notes")]
        match = "notes.fsproj exists and is not a FewShot Studio project"
    else:
        ckpt = str(tmp_path / "model.safetensors")
        Path(ckpt).write_bytes(b"garbage")
        match = "not a FewShot Studio checkpoint"
    rc = main(["label", "--checkpoint", ckpt, "--support", str(support), "--query", str(query),
               "--out", str(out), "--cache", str(tmp_path / "c.sqlite"), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1].startswith("error: ") and match in err[-1]
    assert "Traceback" not in "\n".join(err)
    assert not (out.is_file())


def test_label_loading_line_comes_first(env: dict, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """On a terminal, ``label`` names the checkpoint on stderr before it imports the engine
    or loads the model (both take seconds): the line is out when the session is being built.
    Not when stderr is a file or a pipe (a refusal there stays one ``error:`` line)."""
    from fewshot_studio.engine import session

    assert _label(env, tmp_path / "l.csv") == 0
    assert "loading" not in capsys.readouterr().err
    monkeypatch.setattr("fewshot_studio.cli.label._interactive", lambda: True)

    seen: list[str] = []
    real = session.LabelingSession.__init__

    def spy(self: object, *a: object, **k: object) -> None:
        seen.append(capsys.readouterr().err)
        real(self, *a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(session.LabelingSession, "__init__", spy)
    assert _label(env, tmp_path / "l.csv") == 0
    assert seen and seen[0].startswith("loading tiny.safetensors\u2026\n")


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_empty_query_folder_warns_and_exits_1(env: dict, tmp_path: Path, fmt: str,
                                              capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """No images under --query: "warning: no images in QUERY", exit 1, the output written with
    no rows (a CSV of the header only), a project without predictions; no model loaded."""
    from fewshot_studio.engine import session
    from fewshot_studio.gui import project_io as pio

    def no_model(*a: object, **k: object) -> None:
        raise AssertionError("the model was loaded for an empty query folder")

    monkeypatch.setattr(session.LabelingSession, "__init__", no_model)
    query = tmp_path / "empty"
    (query / "sub").mkdir(parents=True)
    (query / "notes.txt").write_text("not an image")
    out, proj = tmp_path / f"l.{fmt}", tmp_path / "p.fsproj"
    rc = main(["label", "--checkpoint", str(env["ckpt"]), "--support", str(env["support"]),
               "--query", str(query), "--out", str(out), "--save-project", str(proj)])
    captured = capsys.readouterr()
    assert rc == 1
    assert f"warning: no images in {query}" in captured.err.splitlines()
    assert "labeled 0 images" in captured.out
    if fmt == "csv":
        assert out.read_text(encoding="utf-8") == ",".join(CSV_COLUMNS) + "\n"
        assert read_csv(out) == []
    else:
        assert json.loads(out.read_text(encoding="utf-8"))["rows"] == []
    project = pio.load_project(proj)
    assert project.predictions is None and project.query_folder == query.resolve()
    assert [c.name for c in project.classes] == sorted(os.listdir(env["support"]))


def test_checkpoints_command(env: dict, capsys: pytest.CaptureFixture[str],
                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A table: name, what it suits (photos / characters), method, backbone, 5-way 1-shot and
    5-shot accuracy from the metadata ('-' when not recorded); results with test-time
    options, validation and calibration never fill those columns; ``--long`` lists all."""
    from fewshot_studio.cli.evaluate import record_result

    assert main(["checkpoints", str(env["ckpt"])]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "FOR", "METHOD", "BACKBONE", "1-SHOT", "5-SHOT"]
    assert lines[1].split() == ["tiny", "photos", "protonet", "(euclidean)", "conv4",
                        "50.0%", "-"]
    copy = env["root"] / "with-options.safetensors"
    make_checkpoint(copy, channels=1)
    record_result(copy, "test TTA x2 5w5s", {"accuracy": 0.6, "ci95": 0.01, "tta": 2})
    record_result(copy, "test transductive x2 5w5s", {"accuracy": 0.7, "transductive": 2})
    record_result(copy, "validation 5w5s", {"accuracy": 0.8, "way": 5, "shot": 5})
    assert main(["checkpoints", str(copy)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["with-options", "characters", "protonet", "(euclidean)",
                        "conv4", "50.0%", "-"]
    record_result(copy, "cross-domain 5w5s", {"accuracy": 0.55, "way": 5, "shot": 5})
    record_result(copy, "held-out test 5w5s", {"accuracy": 0.65, "way": 5, "shot": 5})
    assert main(["checkpoints", "--long", str(copy)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[1].split()[-2:] == ["50.0%", "65.0%"]  # the test set first
    assert "input: 32px gray" in out and "test 5w1s" in out and "50.0±1.0%" in out
    assert "test TTA x2 5w5s" in out and "validation 5w5s" in out
    folder = env["root"] / "bundled"
    folder.mkdir(exist_ok=True)
    make_checkpoint(folder / "demo-net.safetensors")
    monkeypatch.setattr("fewshot_studio.paths.checkpoints_dir", lambda: folder)
    assert main(["checkpoints"]) == 0
    assert "demo-net" in capsys.readouterr().out


def test_checkpoints_bundled_table(capsys: pytest.CaptureFixture[str]) -> None:
    """The bundled checkpoints: photos for natural-*, characters for omniglot-*, both
    accuracies recorded, and no line longer than 100 characters."""
    from fewshot_studio.paths import bundled_checkpoints

    bundled = bundled_checkpoints()
    if not bundled:
        pytest.skip("no bundled checkpoints")
    assert main(["checkpoints"]) == 0
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 100
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:len(bundled) + 1]}
    assert set(rows) == set(bundled)
    for name, cells in rows.items():
        assert cells[1] == ("photos" if name.startswith("natural") else "characters")
        assert all(c.endswith("%") and 50 < float(c[:-1]) <= 100 for c in cells[-2:]), cells


def test_export_onnx_command(env: dict, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "model.onnx"
    assert main(["export-onnx", "--checkpoint", str(env["ckpt"]), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert out.is_file() and "max abs difference vs torch" in text and "ok" in text
    assert main(["export-onnx", "--checkpoint", str(env["ckpt"]), "--out", str(out),
                 "--tolerance", "-1"]) == 1
    assert not out.exists()


def test_move_to(env: dict, tmp_path: Path) -> None:
    src = tmp_path / "q"
    src.mkdir()
    for rel in ("red_0.jpg", "blue_0.jpg", "fake.jpg"):
        (src / rel).write_bytes((env["query"] / rel).read_bytes())
    rc = main(["label", "--checkpoint", str(env["ckpt"]), "--support", str(env["support"]),
               "--query", str(src), "--out", str(tmp_path / "l.csv"), "--cache",
               str(env["cache"]), "--unknown-threshold", "0", "--move-to", str(tmp_path / "m")])
    assert rc == 0
    assert sorted(os.listdir(src)) == ["fake.jpg"]
    assert (tmp_path / "m" / "red" / "red_0.jpg").is_file()
    assert (tmp_path / "m" / "blue" / "blue_0.jpg").is_file()


# -- issue 14 ------------------------------------------------------------------------------
def test_labels_csv_and_folder_are_corrections_or_examples(
        env: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--labels``: a query image listed is a correction (its row says so, with that label,
    even against the colour); an image outside the query folder becomes a support example;
    a missing file is noted and ignored. A class folder tree works the same way."""
    extra = tmp_path / "extra" / "blue"
    extra.mkdir(parents=True)
    (extra / "b.jpg").write_bytes((env["query"] / "blue_0.jpg").read_bytes())
    labels = tmp_path / "mine.csv"
    labels.write_text(f"path,label\nred_0.jpg,green\nsub/blue_3.jpg,blue\n"
                      f"{extra / 'b.jpg'},blue\ngone.jpg,red\n,red\n", encoding="utf-8")
    out = tmp_path / "l.csv"
    assert _label(env, out, "--labels", str(labels)) == 0
    assert ("--labels: 2 corrections, 1 support examples, 1 missing files ignored"
            in capsys.readouterr().err)
    by = {r["path"]: r for r in read_csv(out)}
    assert by["red_0.jpg"]["label"] == "green" and by["red_0.jpg"]["corrected"] == "true"
    assert by["sub/blue_3.jpg"]["corrected"] == "true"
    assert sum(r["corrected"] == "true" for r in by.values()) == 2
    tree = tmp_path / "tree"
    (tree / "red").mkdir(parents=True)
    (tree / "red" / "x.png").write_bytes((env["query"] / "green_1.png").read_bytes())
    assert _label(env, out, "--labels", str(tree)) == 0
    assert "--labels: 0 corrections, 1 support examples" in capsys.readouterr().err
    (tree / "purple").mkdir()
    (tree / "purple" / "y.png").write_bytes((tree / "red" / "x.png").read_bytes())
    assert _label(env, out, "--labels", str(tree)) == 2
    assert "classes not in --support: 'purple'" in capsys.readouterr().err
    # a flat folder is one class named after it (data/scan.py's rule, as in the app)
    assert _label(env, out, "--labels", str(env["query"] / "sub")) == 2
    assert "classes not in --support: 'sub'" in capsys.readouterr().err
    (tmp_path / "nothing" / "empty").mkdir(parents=True)
    assert _label(env, out, "--labels", str(tmp_path / "nothing")) == 2
    assert "no class sub-folders with images" in capsys.readouterr().err
    (tmp_path / "empty.csv").write_text("path,label\n", encoding="utf-8")  # as the app: refused
    assert _label(env, out, "--labels", str(tmp_path / "empty.csv")) == 2
    assert "no labels in it" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["unknown_class", "missing", "skip_unknown_alone"])
def test_labels_and_skip_unknown_refusals(env: dict, tmp_path: Path, case: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Refused before any work (exit 2, no output): a --labels class that --support lacks, a
    missing --labels, --skip-unknown without --copy-to / --move-to."""
    labels = tmp_path / "l.csv"
    labels.write_text("path,label\nred_0.jpg,purple\n", encoding="utf-8")
    extra = {"unknown_class": ["--labels", str(labels)],
             "missing": ["--labels", str(tmp_path / "nope.csv")],
             "skip_unknown_alone": ["--skip-unknown"]}[case]
    out = tmp_path / "out.csv"
    assert _label(env, out, *extra) == 2
    err = capsys.readouterr().err
    assert {"unknown_class": "'purple'", "missing": "not found",
            "skip_unknown_alone": "needs --copy-to"}[case] in err
    assert not out.exists()


def test_copy_to_skip_unknown(env: dict, tmp_path: Path) -> None:
    """``--skip-unknown``: exactly the images with a label are copied; no ``_unknown``."""
    out, dest = tmp_path / "l.csv", tmp_path / "sorted"
    assert main(["label", "--checkpoint", str(env["ckpt"]), "--support", str(env["support"]),
                 "--query", str(env["query"]), "--out", str(out), "--cache", str(env["cache"]),
                 "--unknown-threshold", "0.99", "--copy-to", str(dest),
                 "--skip-unknown"]) == 0
    rows = read_csv(out)
    copied = sorted(p.relative_to(dest).parts[0] for p in dest.rglob("*") if p.is_file())
    assert copied == sorted(r["label"] for r in rows if r["label"])
    assert not (dest / "_unknown").exists()


def test_backend_names_come_from_the_engine(env: dict, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """``--backend``: the help names every backend of the engine's table, and a name not in
    it is refused before any work (exit 2, nothing written)."""
    from fewshot_studio.engine.backends import BACKEND_NAMES

    with pytest.raises(SystemExit):
        main(["label", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert all(name in help_text for name in BACKEND_NAMES)
    out = tmp_path / "l.csv"
    assert _label(env, out, "--backend", "tensorrt") == 2
    assert "unknown backend 'tensorrt'" in capsys.readouterr().err
    assert not out.exists()
