"""The ETA estimator: the rate counts only work done while it watched."""

from __future__ import annotations

import pytest

from fewshot_studio import progress
from fewshot_studio.progress import EtaEstimator


def test_rate_ignores_work_before_the_first_update(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([0.0, 30.0, 31.0, 33.0])  # start, first report, then 2 s per 10 steps
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    est = EtaEstimator(smoothing=1.0)
    est.update(1990)  # a resumed run reports the 1,990 steps it already had
    assert est.rate is None and est.eta(1990, 5000) is None
    est.update(2000)
    assert est.rate == pytest.approx(10.0)  # 10 steps in 1 s, not 2000 in 31 s
    est.update(2020)
    assert est.rate == pytest.approx(10.0)
    assert est.eta(2020, 5000) == pytest.approx(298.0)


def test_run_with_bar_returns_the_payload_and_closes_the_bar() -> None:
    import io

    from fewshot_studio.progress import Progress, ProgressBar, run_with_bar

    def work(result: object):
        yield Progress(1, 2)
        yield Progress(2, 2, payload=result)

    stream = io.StringIO()
    assert run_with_bar(work(3.5), ProgressBar("x", stream=stream), float) == 3.5
    assert stream.getvalue().endswith("\n")  # closed: the line is finished
    with pytest.raises(RuntimeError, match="float"):
        run_with_bar(work("not a float"), ProgressBar("x", stream=io.StringIO()), float)
