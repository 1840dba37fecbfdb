"""Test-time fine-tuning (models/finetune.py): the split of each backbone computes what the
backbone does, the input model is never changed, only the trainable suffix changes, a seed
fixes the result, closing the generator cancels, and on a tiny generated problem fine-tuning
on the support set helps on held-out queries."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_train import make_glyphs, one_thread  # noqa: F401  (autouse fixture)
from PIL import Image

from fewshot_studio.data.preprocess import Preprocess
from fewshot_studio.errors import UserError
from fewshot_studio.models import create_method
from fewshot_studio.models.backbones import Conv4
from fewshot_studio.models.backbones.efficientnet_lite0 import EfficientNetLite0
from fewshot_studio.models.backbones.resnet12 import ResNet12
from fewshot_studio.models.finetune import (
    FinetuneSettings,
    augment_for,
    can_finetune,
    embed_from_prefix,
    finetune,
    prefix_maps,
)

PRE = Preprocess(image_size=28, channels=1, mean=(0.5,), std=(0.5,))


def tiny_protonet(seed: int = 0, hidden: int = 16) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = create_method("protonet", Conv4(1, 28, hidden=hidden))
    model.train()
    model.embed(torch.randn(16, 1, 28, 28))  # non-trivial BatchNorm statistics
    return model.eval()


def run(gen: object) -> tuple[list, torch.nn.Module]:
    steps = list(gen)  # type: ignore[call-overload]
    return steps, steps[-1].payload


def support(n_way: int = 3, shot: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    return torch.randn(n_way * shot, 1, 28, 28), torch.arange(n_way).repeat_interleave(shot)


@pytest.mark.parametrize("backbone,blocks,size", [
    (lambda: Conv4(1, 28, hidden=8), 1, 28), (lambda: Conv4(1, 28, hidden=8), 3, 28),
    (lambda: ResNet12(3, 32, widths=(8, 8, 16)), 2, 32),
    (lambda: EfficientNetLite0(3, 32, readout="multilevel"), 1, 32),
    (lambda: EfficientNetLite0(3, 32, readout="head"), 3, 32)])
def test_split_computes_what_the_backbone_does(backbone, blocks: int, size: int) -> None:
    torch.manual_seed(0)
    model = create_method("protonet", backbone(), pool="avg").eval()
    kind = type(model.backbone)
    x = torch.randn(4, model.backbone.in_channels, size, size)
    with torch.no_grad():
        whole = model.embed(x)
        maps = prefix_maps(model, x, blocks)
        cut = embed_from_prefix(model, maps, blocks)
    torch.testing.assert_close(cut, whole)
    assert type(model.backbone) is kind  # restored after the cut


def test_input_unchanged_and_only_the_suffix_trains() -> None:
    model = tiny_protonet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = support()
    settings = FinetuneSettings(steps=5, lr=1e-2, blocks=2, views=2)
    steps, adapted = run(finetune(model, x, y, augment_for(PRE), settings))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    changed = {k for k, v in adapted.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith(("backbone.encoder.2.", "backbone.encoder.3."))
                           for k in changed), changed
    # BatchNorm statistics are kept (eval mode throughout); its affine weights train
    assert not any("running" in k for k in changed)
    assert any(k.endswith("1.weight") for k in changed)
    assert adapted is not model and not adapted.training
    assert not any(p.requires_grad for p in adapted.parameters())
    total = settings.views + 1 + settings.steps
    assert [p.done for p in steps] == [*range(1, total + 1), total]
    assert all(p.total == total for p in steps)
    assert all(p.payload is None for p in steps[:-1]) and "loss" in steps[-2].metrics
    assert isinstance(adapted.backbone, Conv4)  # whole when it is handed out


def test_seed_fixes_the_result_and_another_seed_changes_it() -> None:
    model = tiny_protonet()
    x, y = support()

    def weights(seed: int) -> torch.Tensor:
        s = FinetuneSettings(steps=3, lr=1e-2, blocks=1, views=2, seed=seed)
        return run(finetune(model, x, y, augment_for(PRE), s))[1].backbone.encoder[3][0].weight

    assert torch.equal(weights(0), weights(0))
    assert not torch.equal(weights(0), weights(1))


def test_closing_the_generator_cancels() -> None:
    model = tiny_protonet()
    x, y = support()
    gen = finetune(model, x, y, augment_for(PRE), FinetuneSettings(steps=1000, views=1))
    seen = [next(gen) for _ in range(4)]
    gen.close()
    assert all(p.payload is None for p in seen)
    with pytest.raises(StopIteration):
        next(gen)
    # the model is whole again: its backbone is the backbone, not a cut
    assert isinstance(model.backbone, Conv4)


def test_what_cannot_be_finetuned_is_refused() -> None:
    torch.manual_seed(0)
    maml = create_method("maml", Conv4(1, 28, hidden=8, track_running_stats=False))
    assert not can_finetune(maml)
    with pytest.raises(UserError, match="does not apply"):
        list(finetune(maml, *support(), augment_for(PRE), FinetuneSettings(steps=1)))
    assert can_finetune(tiny_protonet())
    with pytest.raises(UserError):
        FinetuneSettings(blocks=0)
    with pytest.raises(UserError):
        FinetuneSettings(way=1)
    assert FinetuneSettings().key() != FinetuneSettings(lr=1.0).key()
    assert FinetuneSettings().key() == FinetuneSettings().key()


@pytest.mark.parametrize("channels", [1, 3])
def test_augment_keeps_the_shape_and_is_random(channels: int) -> None:
    pre = Preprocess(image_size=24, channels=channels, mean=(0.5,) * channels,
                     std=(0.25,) * channels)
    x = torch.rand(3, channels, 24, 24) * 2 - 1
    g = torch.Generator().manual_seed(0)
    aug = augment_for(pre)
    a, b = aug(x, g), aug(x, g)
    assert a.shape == x.shape and not torch.allclose(a, b)
    torch.testing.assert_close(augment_for(pre, strength=0.0)(x.clamp(-1, 1), g),
                               x.clamp(-1, 1), atol=1e-4, rtol=0)


def load_glyphs(root: Path, names: list[str], per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for c, name in enumerate(names):
        for f in sorted((root / name).glob("*.png"))[:per_class]:
            a = np.asarray(Image.open(f), np.float32) / 255.0
            xs.append((a - 0.5) / 0.5)
            ys.append(c)
    return torch.from_numpy(np.stack(xs))[:, None], torch.tensor(ys)


def test_finetuning_helps_on_held_out_queries(tmp_path: Path) -> None:
    """Random strokes, jittered: an untrained Conv4 confuses the jittered copies; a few
    steps on augmented views of five examples a class make the queries (other copies) more
    often right."""
    names = make_glyphs(tmp_path, n_classes=5, n_per_class=15, seed=3)
    x, y = load_glyphs(tmp_path, names, 15)
    is_support = (torch.arange(len(y)) % 15) < 5
    model = tiny_protonet(seed=0, hidden=32)

    def accuracy(m: torch.nn.Module) -> float:
        with torch.no_grad():
            f = m.embed(x)
            logits = m.fit(f[is_support], y[is_support], 5)(f[~is_support])
        return float((logits.argmax(-1) == y[~is_support]).float().mean())

    settings = FinetuneSettings(steps=40, lr=3e-3, blocks=2, views=4, seed=0)
    _, adapted = run(finetune(model, x[is_support], y[is_support], augment_for(PRE), settings))
    before, after = accuracy(model), accuracy(adapted)
    assert after >= before + 0.1, (before, after)


def test_label_session_finetunes_and_caches_by_support(tmp_path: Path) -> None:
    """``adapt="finetune"``: the session fine-tunes a copy (the checkpoint file and the
    session's own model stay as they were), embeds the queries with it (features under
    their own cache key: a rerun with the same examples embeds nothing and fine-tunes
    nothing), labels them, and another example set makes another fine-tuned model."""
    from dataclasses import replace

    from engine_fixtures import make_checkpoint, make_queries, make_support

    from fewshot_studio.engine import finetuned
    from fewshot_studio.engine.api import LabelSettings, Status
    from fewshot_studio.engine.session import LabelingSession

    ckpt = make_checkpoint(tmp_path / "tiny.safetensors")
    original = ckpt.read_bytes()
    support = make_support(tmp_path / "support")
    truth = make_queries(tmp_path / "query")
    queries = [tmp_path / "query" / rel for rel in truth]
    settings = LabelSettings(adapt="finetune", unknown_threshold=0.0)
    quick = replace(finetuned.FINETUNE_SETTINGS, steps=4, views=1)
    with LabelingSession(ckpt, settings, cache_path=tmp_path / "c.sqlite",
                         backend="torch") as s:
        s.finetuned.settings = quick
        base = {k: v.clone() for k, v in s.model.state_dict().items()}
        s.set_support(support)
        steps = list(s.run(queries))
        assert any(p.message == "fine-tuning on the examples" for p in steps)
        preds = s.predictions()
        assert len(preds) == len(truth) and all(p.status == Status.OK for p in preds)
        assert sum(p.label == truth[str(p.path.relative_to(tmp_path / "query"))]
                   for p in preds) >= len(truth) - 1
        adapted, first_id = s.finetuned.model, s.finetuned.model_id
        assert adapted is not None and adapted is not s.model and s.head.model is adapted
        assert first_id != s.model_id
        assert all(torch.equal(v, base[k]) for k, v in s.model.state_dict().items())
        assert any(not torch.equal(v, base[k]) for k, v in adapted.state_dict().items())
        embedded = s.counters.embedded
        list(s.run(queries))  # same examples: same copy, every feature from the cache
        assert s.finetuned.model is adapted and s.counters.embedded == embedded
        s.set_support({k: v[:2] for k, v in support.items()})
        list(s.run(queries))
        assert s.finetuned.model is not adapted and s.finetuned.model_id != first_id
        assert s.counters.embedded > embedded
        s.set_settings(replace(settings, adapt="none"))
        list(s.run(queries))  # back to the checkpoint's model
        assert s.head.model is s.model and s.embedding.model is s.model
    assert ckpt.read_bytes() == original


def test_cancelling_a_run_while_it_finetunes_keeps_the_session_whole(tmp_path: Path) -> None:
    from dataclasses import replace

    from engine_fixtures import make_checkpoint, make_queries, make_support

    from fewshot_studio.engine import finetuned
    from fewshot_studio.engine.api import LabelSettings
    from fewshot_studio.engine.session import LabelingSession

    ckpt = make_checkpoint(tmp_path / "tiny.safetensors")
    support = make_support(tmp_path / "support")
    queries = [tmp_path / "query" / rel for rel in make_queries(tmp_path / "query")]
    with LabelingSession(ckpt, LabelSettings(adapt="finetune"),
                         cache_path=tmp_path / "c.sqlite", backend="torch") as s:
        s.finetuned.settings = replace(finetuned.FINETUNE_SETTINGS, steps=1000, views=1)
        s.set_support(support)
        gen = s.run(queries)
        while next(gen).message != "fine-tuning on the examples":
            pass
        gen.close()
        assert s.finetuned.model is None and s.embedding.model is s.model
        assert s.predictions() == []
        s.finetuned.settings = replace(s.finetuned.settings, steps=2)
        list(s.run(queries))
        assert s.finetuned.model is not None and len(s.predictions()) == len(queries)


def test_eval_adapt_finetune_helps_and_leaves_the_checkpoint(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]
                                                           ) -> None:
    """``eval --adapt finetune`` fine-tunes a copy on each episode's support set: on the
    generated glyphs, where an untrained Conv4 confuses the jittered copies, it is right
    more often than the checkpoint as it is on the same episodes, and the checkpoint file
    is unchanged (its result recorded under its own name with --write-results)."""
    from fewshot_studio.cli import main
    from fewshot_studio.io.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
    from fewshot_studio.models import model_spec

    make_glyphs(tmp_path / "glyphs", n_classes=6, n_per_class=12, seed=3)
    model = tiny_protonet(seed=0, hidden=32)
    ckpt = save_checkpoint(tmp_path / "tiny.safetensors", Checkpoint(
        model=model_spec(model, "conv4", model.backbone.config()), preprocess=PRE,
        state_dict=model.state_dict(), name="tiny"))
    weights = load_checkpoint(ckpt).state_dict
    common = ["eval", "--checkpoint", str(ckpt), "--data", str(tmp_path / "glyphs"),
              "--way", "3", "--shot", "5", "--query", "5", "--episodes", "3", "--device",
              "cpu"]
    accuracy = {}
    for adapt in ("none", "finetune"):
        assert main([*common, "--adapt", adapt, "--write-results", "--label", "g"]) == 0
        out = capsys.readouterr().out
        assert ("fine-tuned on each support set" in out) == (adapt == "finetune")
        accuracy[adapt] = float(out.split("accuracy: ")[1].split("%")[0])
    assert accuracy["finetune"] >= accuracy["none"] + 5, accuracy
    back = load_checkpoint(ckpt)
    assert all(torch.equal(v, weights[k]) for k, v in back.state_dict.items())
    assert back.evaluation["g finetune 3w5s"]["adapt"] == "finetune"
    assert "adapt" not in back.evaluation["g 3w5s"]


def test_pseudo_episodes_hold_out_queries_where_a_class_has_enough() -> None:
    from fewshot_studio.models.finetune import _split_class

    g = torch.Generator().manual_seed(0)
    five = torch.tensor([3, 4, 7, 8, 9])
    sup, qry, same = _split_class(five, 2, g)
    assert not same and qry.numel() == 2 and sup.numel() == 3
    assert sorted(torch.cat([sup, qry]).tolist()) == five.tolist()
    for members, query in ((torch.tensor([5]), 2), (torch.tensor([1, 2]), 2), (five, 0)):
        sup, qry, same = _split_class(members, query, g)
        assert same and torch.equal(sup, members) and torch.equal(qry, members)
    model = tiny_protonet()
    x, y = support(n_way=3, shot=3)

    def weights(query: int) -> torch.Tensor:
        s = FinetuneSettings(steps=3, lr=1e-2, blocks=1, views=2, query=query)
        return run(finetune(model, x, y, augment_for(PRE), s))[1].backbone.encoder[3][0].weight

    assert torch.equal(weights(1), weights(1)) and not torch.equal(weights(1), weights(0))


def test_cli_label_adapt_finetune_labels_every_query(tmp_path: Path) -> None:
    from engine_fixtures import make_checkpoint, make_queries, make_support

    from fewshot_studio.cli import main
    from fewshot_studio.engine.export import read_csv

    ckpt = make_checkpoint(tmp_path / "tiny.safetensors")
    make_support(tmp_path / "support")
    truth = make_queries(tmp_path / "query")
    out = tmp_path / "labels.csv"
    assert main(["label", "--checkpoint", str(ckpt), "--support", str(tmp_path / "support"),
                 "--query", str(tmp_path / "query"), "--out", str(out), "--cache",
                 str(tmp_path / "c.sqlite"), "--adapt", "finetune", "--unknown-threshold",
                 "0"]) == 0
    rows = {r["path"]: r["label"] for r in read_csv(out)}
    assert set(rows) == set(truth)
    assert sum(rows[p] == truth[p] for p in truth) >= len(truth) - 1
