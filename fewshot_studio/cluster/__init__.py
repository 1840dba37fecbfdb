"""Labeling on a Ray cluster (``fewshot-studio label --ray ADDRESS``; the optional extra
``pip install "fewshot-studio[cluster]"``).

The driver embeds the support set once and fits the head (the engine's own
:class:`~fewshot_studio.engine.session.LabelingSession`); the query files go through Ray Data
(paths -> ``map_batches`` with actor workers that each hold a session's backend,
:mod:`.worker`) and come back as features, in path order, batch by batch; the driver runs the
same head, unknown rule and adaptation on each batch (:mod:`.hooks`) and streams the rows to
the output. Nothing here imports Qt; only :mod:`.driver` and :mod:`.worker` import Ray, and
only when a run starts. See docs/scale.md.
"""
