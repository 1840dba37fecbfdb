"""``fewshot-studio label --ray ADDRESS``: the same labels as a local run, from a Ray cluster
(:mod:`fewshot_studio.cluster`), streamed to ``--out`` (CSV or Parquet) batch by batch: the
driver never holds every prediction. See docs/scale.md."""

from __future__ import annotations

import argparse
import heapq
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from fewshot_studio.cli.label import Outcome, Plan, outcome
from fewshot_studio.engine.api import Prediction, Status
from fewshot_studio.progress import Progress, ProgressBar

if TYPE_CHECKING:
    from fewshot_studio.cluster.driver import PathBlocks


def _in_order(batch: Sequence[Prediction], extra: list[Prediction]) -> Iterator[Prediction]:
    """``batch`` (in path order) with the rows of ``extra`` (sorted; consumed) that sort
    before its last path merged in, as a file in path order needs them."""
    if not batch:
        return iter(())
    last = Path(batch[-1].path)
    n = 0
    while n < len(extra) and Path(extra[n].path) <= last:
        n += 1
    head = extra[:n]
    del extra[:n]
    return heapq.merge(batch, head, key=lambda p: Path(p.path))


def _put_queries(args: argparse.Namespace, plan: Plan, blocks: PathBlocks) -> None:
    """The query folder's images, streamed from a second walk (``plan.queries`` counted them:
    a ``keep=False`` scan), into Ray's object store as ``blocks``; a progress bar of its own.
    What this walk leaves out or cannot read is what the counting walk reported (the same
    rules): ``plan``'s notes and error rows stand."""
    from fewshot_studio.data.scan import iter_images

    bar = ProgressBar("listing", unit="img")
    expected = plan.queries.total
    for n in blocks.put(iter_images(args.query, recursive=not args.no_recursive,
                                    exclude=list(plan.why))):
        bar.update(Progress(n, max(n, expected)))
    bar.update(Progress(blocks.total, blocks.total), force=True)
    bar.close()


def label_on_ray(args: argparse.Namespace, plan: Plan) -> Outcome:
    """Label the query folder (counted in ``plan.queries``) on the Ray cluster ``args.ray``;
    the paths go from the folder walk to Ray's object store a block at a time, the rows
    stream to ``args.out`` in ``plan.fmt`` (which has a sink), unreadable sub-folders' error
    rows in their sorted places: no per-image list on the driver. The driver embeds the
    support set through ``--cache`` (or the default cache); the workers use ``--cache`` on
    their own nodes when it is given, no cache otherwise."""
    from fewshot_studio.cluster import driver
    from fewshot_studio.engine.export import checked
    from fewshot_studio.engine.session import LabelingSession

    assert plan.fmt.sink is not None
    # --device cuda is for the workers (plan_layout checks the cluster has GPUs): the
    # driver embeds the examples with what it has
    here = replace(plan.settings, device="auto") if args.device == "cuda" else plan.settings
    started = driver.connect(args.ray)
    try:
        t0 = time.perf_counter()
        with LabelingSession(args.checkpoint, here, cache_path=args.cache,
                             backend=args.backend) as session:
            session.set_support(plan.classes)
            layout = driver.layout_for(args.device, args.ray_workers, args.ray_cpus_per_worker)
            blocks = driver.PathBlocks(driver.block_rows(plan.queries.total, layout))
            _put_queries(args, plan, blocks)
            counts = dict.fromkeys(Status, 0)
            extra = sorted(plan.folder_rows(), key=lambda p: Path(p.path))
            metrics: dict[str, float] = {}
            bar = ProgressBar("labeling", unit="img")
            stream = driver.label_stream(session, blocks, layout, backend=args.backend,
                                         cache=args.cache, worker_settings=plan.settings)
            with plan.fmt.sink(args.out, args.query, args.absolute_paths) as add:
                for p in stream:
                    bar.update(p, force=p.done == p.total)
                    preds = [checked(q) for q in p.payload or ()]
                    for q in preds:
                        counts[q.status] += 1
                    add(list(_in_order(preds, extra)))
                    metrics = p.metrics or metrics
                add(extra)
            bar.close()
            support_embedded = session.counters.embedded
            return outcome(counts, time.perf_counter() - t0, session,
                           support_embedded + int(metrics.get("embedded", 0)),
                           session.counters.cache_hits + int(metrics.get("cache_hits", 0)),
                           f"Ray {layout} (examples: {session.backend})")
    finally:
        driver.disconnect(started)
