"""``label --ray``: the cluster path gives a local run's rows (a real local Ray, 2 CPUs).

The Ray tests are slow (a Ray start and worker start-ups, about a minute together): ``make
test-cluster`` runs them (``.ci/run`` calls it); they skip when Ray is not installed. The
layout and ordering helpers are tested without Ray.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from engine_fixtures import make_checkpoint, make_label_folders

from fewshot_studio.cli import main
from fewshot_studio.engine.api import Prediction, Status
from fewshot_studio.engine.export import read_csv, read_parquet
from fewshot_studio.errors import UserError

FAULT_DIR = "FEWSHOT_TEST_FAULT_DIR"  # a worker dies once, on its 2nd batch, when set


def die_once_hook() -> None:
    """Ray ``worker_process_setup_hook`` (runs in every worker process): when the folder
    ``$FEWSHOT_TEST_FAULT_DIR`` holds ``armed`` and not ``died``, the embedding worker's
    second batch kills its process outright (``os._exit``), mid-run, once."""
    from fewshot_studio.cluster.worker import EmbedWorker

    real = EmbedWorker.__call__
    calls = {"n": 0}

    def call(self: EmbedWorker, batch: dict) -> dict:
        calls["n"] += 1
        folder = Path(os.environ.get(FAULT_DIR, "/nonexistent"))
        if calls["n"] == 2 and (folder / "armed").exists() and not (folder / "died").exists():
            (folder / "died").write_text(str(os.getpid()))
            os._exit(1)
        return real(self, batch)

    EmbedWorker.__call__ = call  # type: ignore[method-assign]


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A real local Ray with 2 CPUs for this module; yields the fault folder."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (the cluster extra)")
    faults = tmp_path_factory.mktemp("faults")
    here = str(Path(__file__).parent)
    path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH", "")) if p)
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={
        "worker_process_setup_hook": f"{Path(__file__).stem}.die_once_hook",
        "env_vars": {FAULT_DIR: str(faults), "PYTHONPATH": path}})
    yield faults
    ray.shutdown()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("cluster")
    ckpt = make_checkpoint(root / "tiny.safetensors")
    support, query, truth, bad = make_label_folders(root)
    return {"ckpt": ckpt, "support": support, "query": query, "truth": truth, "bad": bad,
            "root": root}


def _label(env: dict, out: Path, *extra: str) -> int:
    return main(["label", "--checkpoint", str(env["ckpt"]), "--support", str(env["support"]),
                 "--query", str(env["query"]), "--out", str(out),
                 "--cache", str(out.with_suffix(".sqlite")), *extra])


def _same_rows(cluster: list[dict], local: list[dict]) -> None:
    """Same files in the same order, same labels, statuses and error reasons; numbers
    within float rounding (the CSV's 6 decimals)."""
    assert [r["path"] for r in cluster] == [r["path"] for r in local]
    for c, lo in zip(cluster, local, strict=True):
        for k in ("label", "status", "error", "top1", "top2", "top3", "corrected"):
            assert c[k] == lo[k], (c["path"], k)
        for k in ("confidence", "margin", "top1_prob", "top2_prob", "top3_prob"):
            assert (c[k] in ("", None)) == (lo[k] in ("", None)), (c["path"], k)
            if c[k] not in ("", None):
                assert float(c[k]) == pytest.approx(float(lo[k]), abs=2e-6), (c["path"], k)


@pytest.mark.slow
def test_ray_csv_is_the_local_csv(ray_local: Path, env: dict, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    """The same CSV as a local run on the same files (the bad files' error rows included),
    and the same rows as Parquet, with the adaptive unknown rule and the many-shot head."""
    assert _label(env, tmp_path / "local.csv", "--unknown-threshold", "0") == 0
    capsys.readouterr()
    assert _label(env, tmp_path / "ray.csv", "--unknown-threshold", "0", "--ray", "local") == 0
    out = capsys.readouterr().out
    assert "backend Ray 1 worker x (2 CPU)" in out
    local = read_csv(tmp_path / "local.csv")
    _same_rows(read_csv(tmp_path / "ray.csv"), local)
    by = {r["path"]: r for r in local}
    assert all(by[p]["status"] == "error" and why in by[p]["error"]
               for p, why in env["bad"].items())
    assert all(by[p]["label"] == c for p, c in env["truth"].items())

    rule = ("--unknown-rule", "adaptive", "--adapt", "head")
    assert _label(env, tmp_path / "local2.csv", *rule) == 0
    assert _label(env, tmp_path / "ray.parquet", *rule, "--ray", "local") == 0
    rows = [{k: "" if v is None else str(v).lower() if isinstance(v, bool) else v
             for k, v in r.items()} for r in read_parquet(tmp_path / "ray.parquet")]
    _same_rows(rows, read_csv(tmp_path / "local2.csv"))


@pytest.mark.slow
def test_ray_streams_the_folder_walk_of_a_local_run(
        ray_local: Path, env: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Folders whose sorted order is not their names' string order ("a/", "a-b", "a.b"), an
    unreadable sub-folder (its error row in place, exit 1) and the output inside the query
    folder (left out): the same CSV as a local run, from the driver's two walks."""
    import shutil

    from bad_input_helpers import deny_listing

    query = tmp_path / "q"
    shutil.copytree(env["query"], query)
    some = sorted(query.glob("*.png"))[:2]
    for d in ("a", "a-b", "a.b", "a/b", "locked"):
        (query / d).mkdir()
        for f in some:
            shutil.copy(f, query / d / f.name)
        shutil.copy(some[0], query / f"{d.replace('/', '_')}.png")
    deny_listing(monkeypatch, query / "locked")
    env = {**env, "query": query}
    assert _label(env, query / "local.csv") == 1
    assert _label(env, query / "ray.csv", "--ray", "local") == 1
    err = capsys.readouterr().err
    assert err.count(f"warning: cannot read folder {query / 'locked'}") == 2
    local, ray_rows = read_csv(query / "local.csv"), read_csv(query / "ray.csv")
    _same_rows(ray_rows, local)
    paths = [r["path"] for r in ray_rows]
    assert paths.index(f"a/b/{some[0].name}") < paths.index("a-b.png") < paths.index(
        "locked") < paths.index(f"odd/{sorted((query / 'odd').iterdir())[0].name}")
    assert not any(p.endswith(".csv") for p in paths)


@pytest.mark.slow
def test_a_killed_worker_is_retried(ray_local: Path, env: dict, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker process killed mid-run (on its second batch) is restarted by Ray, the batch
    redone, and the run completes with every row; progress counts up to the total."""
    from fewshot_studio.cli.label import support_classes
    from fewshot_studio.cluster import driver
    from fewshot_studio.data.scan import scan_images
    from fewshot_studio.engine.api import LabelSettings
    from fewshot_studio.engine.session import LabelingSession

    monkeypatch.setattr(driver, "BLOCK_ROWS", 4)
    (ray_local / "armed").write_text("")
    queries = list(scan_images(env["query"]))
    settings = LabelSettings(unknown_threshold=0.0)
    with LabelingSession(env["ckpt"], settings, cache_path=tmp_path / "c.sqlite") as s:
        s.set_support(support_classes(env["support"]))
        layout = driver.layout_for("auto")
        blocks = driver.PathBlocks(driver.block_rows(len(queries), layout))
        assert list(blocks.put(iter(queries)))[-1] == len(queries)
        steps = list(driver.label_stream(s, blocks, layout))
    assert (ray_local / "died").exists()  # the fault happened
    preds: list[Prediction] = [p for step in steps for p in step.payload or ()]
    assert [p.path for p in preds] == sorted(queries, key=Path)
    done = [step.done for step in steps]
    assert done == sorted(done) and done[-1] == len(queries)
    with LabelingSession(env["ckpt"], settings, cache_path=tmp_path / "c.sqlite") as s:
        s.set_support(support_classes(env["support"]))
        list(s.run(queries))
        local = s.predictions()
    assert [(p.label, p.status, p.error) for p in preds] == [
        (p.label, p.status, p.error) for p in local]


@pytest.mark.parametrize("extra, match", [
    (("--format", "json"), "--ray writes csv or parquet, not json"),
    (("--transductive",), "--transductive cannot be used with --ray"),
    (("--copy-to", "sorted"), "--copy-to cannot be used with --ray"),
])
def test_ray_refuses_what_needs_every_row(env: dict, tmp_path: Path, extra: tuple[str, ...],
                                          match: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Refused before any work (exit 2, nothing written): outputs that are not streamed,
    and options that need every query or prediction at once."""
    out = tmp_path / "l.csv"
    assert _label(env, out, "--ray", "local", *extra) == 2
    assert match in capsys.readouterr().err
    assert not out.exists()


def test_layout_one_worker_per_gpu_or_per_cpus() -> None:
    from fewshot_studio.cluster.driver import Layout, plan_layout

    assert plan_layout({"CPU": 2}, "auto") == Layout(1, 2.0, 0.0)
    assert plan_layout({"CPU": 64}, "auto") == Layout(8, 8.0, 0.0)
    assert plan_layout({"CPU": 64}, "auto", cpus_per_worker=4) == Layout(16, 4.0, 0.0)
    assert plan_layout({"CPU": 32, "GPU": 4}, "auto") == Layout(4, 8.0, 1.0)
    assert plan_layout({"CPU": 32, "GPU": 4}, "cpu") == Layout(4, 8.0, 0.0)
    assert plan_layout({"CPU": 32, "GPU": 4}, "auto", workers=2) == Layout(2, 8.0, 1.0)
    with pytest.raises(UserError, match="no GPU"):
        plan_layout({"CPU": 8}, "cuda")


def test_predict_features_is_a_local_runs_head(env: dict, tmp_path: Path) -> None:
    """Features embedded apart (a worker's pipeline) and labeled by the head ``run([])``
    fitted: a local run's predictions, batch by batch; refused before any fit."""
    from fewshot_studio.cli.label import support_classes
    from fewshot_studio.cluster import hooks
    from fewshot_studio.data.scan import scan_images
    from fewshot_studio.engine.api import LabelSettings
    from fewshot_studio.engine.session import LabelingSession

    queries = list(scan_images(env["query"]))
    settings = LabelSettings(unknown_rule="adaptive", adapt="head")
    with LabelingSession(env["ckpt"], settings, cache_path=tmp_path / "c.sqlite") as s:
        s.set_support(support_classes(env["support"]))
        list(s.run(queries))
        local = s.predictions()
    with LabelingSession(env["ckpt"], settings, cache_path=tmp_path / "c.sqlite") as s:
        s.set_support(support_classes(env["support"]))
        with pytest.raises(RuntimeError, match="run"):
            s.predict_features(queries[:1], [np.zeros(1, np.float32)])
        hooks.fit_head(s)
        errors = s.counters.errors
        got = [p for i in range(0, len(queries), 5) for p in s.predict_features(
            queries[i:i + 5], hooks.embed_paths(s, queries[i:i + 5]))]
        assert s.counters.errors - errors == len(env["bad"])
        assert s.predictions() == []  # the session's own queries are untouched
    assert [(p.path, p.label, p.status, p.error) for p in got] == [
        (p.path, p.label, p.status, p.error) for p in local]
    assert [p.confidence for p in got] == pytest.approx([p.confidence for p in local],
                                                        abs=1e-6)


def test_block_rows_spread_small_runs_and_cap_the_block_count() -> None:
    from fewshot_studio.cluster.driver import Layout, block_rows

    two = Layout(2, 8.0, 0.0)
    assert block_rows(10, two) == 2  # 4 blocks per worker at least
    assert block_rows(50_000, two) == 1024
    assert block_rows(2048 * 1024, two) == 1024
    assert block_rows(10_000_000, two) == 4883  # at most 2,048 blocks
    assert block_rows(0, two) == 1


def test_path_blocks_take_the_engine_order_only(tmp_path: Path) -> None:
    """Paths go to Ray in the order the rows come back: a stream out of order (or relative)
    is refused before anything is put, as it could not be sorted without holding it."""
    pytest.importorskip("ray", reason="Ray is not installed (the cluster extra)")
    from fewshot_studio.cluster.driver import PathBlocks

    for paths in ([tmp_path / "b.png", tmp_path / "a.png"],  # within a block
                  [tmp_path / "a.png", tmp_path / "a/x.png"],  # string order, not Path's
                  [Path("a.png")]):
        blocks = PathBlocks(2)
        with pytest.raises(ValueError, match="strictly increasing"):
            list(blocks.put(paths))
        assert blocks.refs == [] and blocks.total == 0


def test_folder_rows_merge_in_path_order(tmp_path: Path) -> None:
    """Unreadable sub-folders' error rows land where a sorted file has them."""
    from fewshot_studio.cli.label_ray import _in_order

    def row(rel: str) -> Prediction:
        return Prediction(tmp_path / rel, None, 0.0, 0.0, Status.ERROR, (), "x")

    extra = [row("b"), row("d/x"), row("z")]
    first = list(_in_order([row("a.jpg"), row("c.jpg")], extra))
    second = list(_in_order([row("e.jpg")], extra))
    assert [p.path.name for p in first] == ["a.jpg", "b", "c.jpg"]
    assert [str(p.path.relative_to(tmp_path)) for p in second] == ["d/x", "e.jpg"]
    assert [p.path.name for p in extra] == ["z"]


def test_without_ray_the_extra_is_named(env: dict, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """Ray not installed: ``--ray`` is a one-line error naming the extra (exit 2)."""
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    assert _label(env, tmp_path / "l.csv", "--ray", "local") == 2
    assert 'pip install "fewshot-studio[cluster]"' in capsys.readouterr().err
