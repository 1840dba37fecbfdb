"""The labeling session end to end on generated folders with planted bad files."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest
from engine_fixtures import (
    COLOURS,
    colour_image,
    make_checkpoint,
    make_label_folders,
    odd_names,
)

from fewshot_studio.data.scan import scan_images
from fewshot_studio.engine.api import LabelSettings, Status
from fewshot_studio.engine.session import LabelingSession
from fewshot_studio.errors import UserError

LABEL_ALL = LabelSettings(unknown_rule="threshold", unknown_threshold=0.0, batch_size=8)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("engine")
    ckpt = make_checkpoint(root / "tiny.safetensors")
    support_root, query_root, truth, bad = make_label_folders(root)
    support = {c: sorted((support_root / c).glob("*.png")) for c in COLOURS}
    return {"root": root, "ckpt": ckpt, "support": support, "query": query_root,
            "truth": truth, "bad": bad, "cache": root / "cache.sqlite"}


def _session(env: dict, settings: LabelSettings = LABEL_ALL, cache: Path | None = None,
             backend: str = "auto") -> LabelingSession:
    s = LabelingSession(env["ckpt"], settings, cache_path=cache or env["cache"], backend=backend)
    s.set_support(env["support"])
    return s


def _cache(env: dict, tmp_path: Path) -> Path:
    """A fresh cache file per test, in the module's folder: the ONNX export kept beside it is
    built once for the module."""
    return env["root"] / f"{tmp_path.name}.sqlite"


def _run(s: LabelingSession, queries: list[Path]) -> list:
    payload = []
    for p in s.run(queries):
        if p.payload:
            payload.extend(p.payload)
    return payload


def _rel(p: Path, root: Path) -> str:
    return p.relative_to(root).as_posix()


def test_scan_skips_hidden_and_non_images(env: dict) -> None:
    q = env["query"]
    found = {_rel(p, q) for p in scan_images(q)}
    expected = set(env["truth"]) | set(env["bad"]) | set(odd_names())
    assert found == expected
    flat = {_rel(p, q) for p in scan_images(q, recursive=False)}
    assert flat == {r for r in expected if "/" not in r}
    with pytest.raises(UserError, match="not found"):
        scan_images(q / "missing")


def test_end_to_end_one_prediction_per_file(env: dict, tmp_path: Path) -> None:
    q = env["query"]
    queries = scan_images(q)
    with _session(env, cache=_cache(env, tmp_path)) as s:
        streamed = _run(s, queries)
        preds = s.predictions()
        counters = s.counters
    assert [p.path for p in preds] == sorted(queries)
    assert len({p.path for p in streamed}) == len(queries)  # every row streamed once
    by_rel = {_rel(p.path, q): p for p in preds}
    for rel, reason in env["bad"].items():
        p = by_rel[rel]
        assert p.status == Status.ERROR and p.label is None, rel
        assert reason in p.error, (rel, p.error)
    for rel, cls in env["truth"].items():
        p = by_rel[rel]
        assert p.status == Status.OK and p.error == "", rel
        assert p.label == cls, (rel, p.top)
        assert 0 < p.confidence <= 1 and 0 <= p.margin <= p.confidence
        assert p.top[0][0] == cls and len(p.top) == 3
        assert abs(sum(prob for _, prob in p.top) - 1.0) < 1e-4
    for rel in odd_names():  # unusual formats are read, not errors
        assert by_rel[rel].status == Status.OK, (rel, by_rel[rel].error)
    assert by_rel["odd/cmyk.jpg"].label == "red"
    assert counters.errors == len(env["bad"])
    assert counters.embedded == len(queries) - len(env["bad"]) + 9  # + the support images


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root reads files whatever their permissions")
def test_unreadable_file_is_an_error_row(env: dict, tmp_path: Path) -> None:
    q = tmp_path / "q"
    q.mkdir()
    colour_image("red", 0).save(q / "ok.png")
    colour_image("red", 1).save(q / "locked.png")
    os.chmod(q / "locked.png", 0)
    try:
        with _session(env, cache=_cache(env, tmp_path)) as s:
            _run(s, scan_images(q))
            preds = {p.path.name: p for p in s.predictions()}
    finally:
        os.chmod(q / "locked.png", 0o644)
    assert preds["locked.png"].status == Status.ERROR
    assert "permission" in preds["locked.png"].error
    assert preds["ok.png"].label == "red"


def test_second_run_embeds_nothing(env: dict, tmp_path: Path) -> None:
    cache = _cache(env, tmp_path)
    queries = scan_images(env["query"])
    with _session(env, cache=cache) as s:
        _run(s, queries)
        first = s.predictions()
        assert s.counters.embedded > 0
    with _session(env, cache=cache) as s:
        _run(s, queries)
        assert s.counters.embedded == 0
        assert s.counters.extra.get("decode_errors", 0) == 0  # cached errors: no decoding
        assert s.counters.cache_hits == len(queries) + 9
        second = s.predictions()
    assert [(p.path, p.label, p.status, p.error) for p in first] == \
        [(p.path, p.label, p.status, p.error) for p in second]
    # the cache stores float32 exactly: a cached rerun gives the same numbers
    assert [p.confidence for p in first] == [p.confidence for p in second]
    assert [p.top for p in first] == [p.top for p in second]
    # A changed file (new mtime) is embedded again, and only it.
    target = env["query"] / "blue_0.jpg"
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with _session(env, cache=cache) as s:
        _run(s, queries)
        assert s.counters.embedded == 1


def test_other_checkpoint_does_not_reuse_features(env: dict, tmp_path: Path) -> None:
    cache = _cache(env, tmp_path)
    other = make_checkpoint(tmp_path / "other.safetensors", seed=1)
    queries = [env["query"] / "red_0.jpg", env["query"] / "green_0.jpg"]
    with _session(env, cache=cache) as s:
        _run(s, queries)
    with LabelingSession(other, LABEL_ALL, cache_path=cache) as s:
        s.set_support(env["support"])
        _run(s, queries)
        assert s.counters.embedded == len(queries) + 9 and s.counters.cache_hits == 0


def test_correction_changes_what_it_should_and_nothing_else(env: dict, tmp_path: Path) -> None:
    q = env["query"]
    queries = scan_images(q)
    settings = replace(LABEL_ALL, corrections_join_support=False)
    with _session(env, settings, cache=_cache(env, tmp_path)) as s:
        _run(s, queries)
        before = s.predictions()
        embedded = s.counters.embedded
        target = q / "blue_0.jpg"
        after = s.correct([target], "red")
        assert s.counters.embedded == embedded  # recomputed from cached features
        changed = [(a, b) for a, b in zip(before, after, strict=True) if a != b]
        assert len(changed) == 1
        old, new = changed[0]
        assert old.label != "red" and not old.corrected
        assert new.path == target and new.label == "red" and new.corrected
        assert new.status == Status.OK and new.confidence == 1.0
        assert s.corrections() == {target: "red"}
        assert s.support() == {c: list(v) for c, v in env["support"].items()}
        undone = s.correct([target], None)
        assert undone == before and s.corrections() == {}
        with pytest.raises(UserError, match="unknown class"):
            s.correct([target], "purple")


def test_corrected_image_joins_support(env: dict, tmp_path: Path) -> None:
    q = env["query"]
    queries = scan_images(q)
    with _session(env, cache=_cache(env, tmp_path)) as s:
        _run(s, queries)
        before = {p.path: p for p in s.predictions()}
        embedded = s.counters.embedded
        target = q / "green_2.jpg"  # a correct label, confirmed: joins the green support
        after = {p.path: p for p in s.correct([target], "green")}
        assert s.counters.embedded == embedded
        assert target in s.support()["green"] and target not in s.support()["red"]
        assert after[target].corrected and after[target].label == "green"
        for path, p in after.items():
            if path == target or p.status == Status.ERROR:
                continue
            assert p.label == before[path].label, path  # easy classes: labels stay
        # the green prototype moved: green probabilities of other images changed
        others = [p for p in after if p != target and after[p].status == Status.OK]
        diffs = [abs(dict(after[p].top)["green"] - dict(before[p].top)["green"]) for p in others]
        assert max(diffs) > 1e-6
        s.correct([target], None)
        assert target not in s.support()["green"]


def test_unknown_threshold(env: dict, tmp_path: Path) -> None:
    queries = scan_images(env["query"])
    with _session(env, cache=_cache(env, tmp_path)) as s:
        _run(s, queries)
        ok = [p for p in s.predictions() if p.status != Status.ERROR]
        assert all(p.status == Status.OK for p in ok)
        confs = sorted(p.confidence for p in ok)
        thr = (confs[len(confs) // 2 - 1] + confs[len(confs) // 2]) / 2
        preds = s.set_settings(replace(s.settings, unknown_threshold=thr))
        for p in preds:
            if p.status == Status.ERROR:
                continue
            if p.confidence < thr:
                assert p.status == Status.UNKNOWN and p.label is None and p.top, p
            else:
                assert p.status == Status.OK and p.label == p.top[0][0]
        n_unknown = sum(p.status == Status.UNKNOWN for p in preds)
        assert 0 < n_unknown < len(ok)
        everything = s.set_settings(replace(s.settings, unknown_threshold=1.01))
        assert all(p.status != Status.OK for p in everything)


def test_transductive_refinement(env: dict, tmp_path: Path) -> None:
    queries = [p for p in scan_images(env["query"])
               if _rel(p, env["query"]) in env["truth"]]
    settings = replace(LABEL_ALL, transductive=True)
    with _session(env, settings, cache=_cache(env, tmp_path)) as s:
        progress = list(s.run(queries))
        assert progress[-1].message == "refined" and len(progress[-1].payload) == len(queries)
        assert s.counters.extra["transductive"] == 1
        refined = s.predictions()
        plain = s.set_settings(replace(settings, transductive=False))
    for p in refined:
        assert p.label == env["truth"][_rel(p.path, env["query"])]
    assert any(abs(a.confidence - b.confidence) > 1e-6 for a, b in zip(refined, plain,
                                                                       strict=True))


def test_bad_support_is_refused_before_queries(env: dict, tmp_path: Path) -> None:
    queries = scan_images(env["query"])
    with LabelingSession(env["ckpt"], LABEL_ALL, cache_path=_cache(env, tmp_path)) as s:
        s.set_support({"red": env["support"]["red"]})
        with pytest.raises(UserError, match="at least 2 classes"):
            list(s.run(queries))
        bad = env["query"] / "text.png"
        s.set_support({"red": env["support"]["red"], "junk": [bad]})
        with pytest.raises(UserError, match="'junk' has no readable"):
            list(s.run(queries))
        s.set_support({"red": env["support"]["red"], "empty": []})
        with pytest.raises(UserError, match="'empty' has no example"):
            list(s.run(queries))
        assert s.counters.embedded == len(env["support"]["red"])  # no query was touched


def test_cancel_and_rerun(env: dict, tmp_path: Path) -> None:
    queries = scan_images(env["query"])
    with _session(env, cache=_cache(env, tmp_path)) as s:
        gen = s.run(queries)
        next(gen)  # "embedding examples"
        first = next(gen)  # first batch
        gen.close()
        partial = s.predictions()
        assert 0 < len(partial) == first.done < len(queries)
        _run(s, queries)
        assert len(s.predictions()) == len(queries)


def test_set_support_and_relabel(env: dict, tmp_path: Path) -> None:
    q = env["query"]
    queries = [p for p in scan_images(q) if _rel(p, q) in env["truth"]]
    with _session(env, cache=_cache(env, tmp_path)) as s:
        _run(s, queries)
        embedded = s.counters.embedded
        two = {"red": env["support"]["red"], "blue": env["support"]["blue"]}
        s.set_support(two)
        preds = s.relabel()
        assert s.class_names == ["red", "blue"]
        assert s.counters.embedded == embedded
        assert {p.label for p in preds} <= {"red", "blue"}
        assert all(len(p.top) == 2 for p in preds)
        for p in preds:
            if env["truth"][_rel(p.path, q)] != "green":
                assert p.label == env["truth"][_rel(p.path, q)]


@pytest.mark.parametrize("scale", [1.0, 0.05])
def test_fast_protonet_scorer_equals_the_model(env: dict, tmp_path: Path, scale: float) -> None:
    import torch

    with _session(env, cache=_cache(env, tmp_path)) as s:
        s.model.scale = scale
        g = torch.Generator().manual_seed(0)
        support = torch.randn(9, 64, generator=g) * 3
        labels = torch.arange(3).repeat(3)
        query = torch.randn(50, 64, generator=g) * 3
        predictor = s.model.fit(support, labels, 3)
        fast = s.head.scorer(predictor)
        assert fast.linear  # the declared one-matrix-product path
        expected = torch.softmax(predictor(query), dim=-1)
        torch.testing.assert_close(fast.probabilities(query), expected, atol=1e-5, rtol=1e-4)
        _, top_logit = fast(query)  # the top logit keeps -s |q|^2
        torch.testing.assert_close(top_logit, predictor(query).max(-1).values,
                                   atol=1e-3, rtol=1e-4)


def test_settings_change_after_new_support_relabels(env: dict, tmp_path: Path) -> None:
    q = env["query"]
    queries = [p for p in scan_images(q) if _rel(p, q) in env["truth"]]
    with _session(env, cache=_cache(env, tmp_path)) as s:
        _run(s, queries)
        s.set_support({"red": env["support"]["red"], "blue": env["support"]["blue"]})
        preds = s.set_settings(replace(s.settings, unknown_threshold=0.01))
        assert all(len(p.top) == 2 and p.top[0][0] in ("red", "blue") for p in preds)
        s.set_support(env["support"])
        again = s.set_settings(replace(s.settings, unknown_threshold=0.0))
        assert [p.label for p in again] == [env["truth"][_rel(p.path, q)] for p in again]
        cheap = s.set_settings(replace(s.settings, unknown_threshold=1.01))  # stored top-k
        assert [p.top for p in cheap] == [p.top for p in again]
        assert all(p.status == Status.UNKNOWN for p in cheap)
