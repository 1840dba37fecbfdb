"""The meta-trainer on a tiny generated dataset: it learns, resumes exactly where it stopped,
leaves a resumable checkpoint when cancelled or interrupted, and rejects bad input before
training starts."""

from __future__ import annotations

import csv
import math
import shutil
from pathlib import Path

import pytest
import torch
from fixtures_train import make_glyphs, one_thread  # noqa: F401 (autouse fixture)
from safetensors.torch import load_file

from fewshot_studio.errors import UserError
from fewshot_studio.io.checkpoint import load_checkpoint
from fewshot_studio.models import METHODS
from fewshot_studio.training.config import TrainConfig
from fewshot_studio.training.evaluate import evaluate
from fewshot_studio.training.trainer import (
    BEST,
    LAST,
    METRICS,
    RESUME,
    BatchMaker,
    TrainResult,
    build_model,
    load_train_state,
    lr_at,
    prepare_data,
    train,
)


@pytest.fixture(scope="module")
def glyphs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("glyphs")
    make_glyphs(root, n_classes=16, n_per_class=10)
    return root


def small_config(data: Path, out: Path, **kw: object) -> TrainConfig:
    base = dict(data=(str(data),), way=5, shot=1, query=5, episodes=40, val_every=20,
                val_episodes=60, val_way=5, val_shot=1, val_fraction=0.35, out=str(out),
                log_every=10, lr=2e-3, backbone_kwargs={"hidden": 32}, seed=0)
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


def run_to_end(config: TrainConfig, resume: bool = False) -> TrainResult:
    result = None
    for p in train(config, resume=resume):
        if isinstance(p.payload, TrainResult):
            result = p.payload
    assert result is not None
    return result


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path).state_dict


def metric_rows(run: Path) -> list[dict[str, str]]:
    with (run / METRICS).open(newline="") as f:
        return list(csv.DictReader(f))


def test_tiny_run_learns_well_above_chance(glyphs: Path, tmp_path: Path) -> None:
    cfg = small_config(glyphs, tmp_path / "run", episodes=150, val_every=50, val_episodes=100)
    # The same model before any training, on the same validation episodes.
    data = prepare_data(cfg, torch.device("cpu"))
    torch.manual_seed(cfg.seed)
    untrained, _ = build_model(cfg)
    before = evaluate(untrained, data.val, cfg.preprocess, 5, 1, data.val_query, 100, seed=1)

    result = run_to_end(cfg)
    assert result.step == 150 and not result.interrupted
    after = result.best_val
    assert after is not None and after.n == 100
    assert after.accuracy > 0.5  # chance is 0.2
    assert after.accuracy > before.accuracy + 0.1
    # validation classes are held out: none of them was trained on
    assert not set(data.val_classes) & set(data.train_classes)
    for name in (BEST, LAST, RESUME, METRICS):
        assert (tmp_path / "run" / name).is_file()
    ckpt = load_checkpoint(tmp_path / "run" / BEST)
    assert TrainConfig.from_dict(ckpt.training["config"]) == cfg
    assert ckpt.evaluation["validation 5w1s"]["accuracy"] == pytest.approx(after.accuracy)
    model = ckpt.build()
    again = evaluate(model, data.val, cfg.preprocess, 5, 1, data.val_query, 100, seed=1)
    assert again.accuracy == pytest.approx(after.accuracy)
    rows = metric_rows(tmp_path / "run")
    assert [int(r["step"]) for r in rows if r["val_acc"]] == [50, 100, 150]


def test_closing_leaves_resumable_checkpoint_and_resume_continues_exactly(
        glyphs: Path, tmp_path: Path) -> None:
    full = small_config(glyphs, tmp_path / "full")
    run_to_end(full)

    part = small_config(glyphs, tmp_path / "part")
    gen = train(part)
    for p in gen:
        if p.done == 27:
            break
    gen.close()  # the GUI's cancel
    tensors, meta = load_train_state(tmp_path / "part" / RESUME)
    assert meta["step"] == 27 and meta["best_val"]["episodes"] == 60  # validated at 20
    assert any(k.startswith("optim.") for k in tensors)
    assert load_checkpoint(tmp_path / "part" / LAST).training["step"] == 27
    assert (tmp_path / "part" / BEST).is_file()

    with pytest.raises(UserError, match="--resume"):
        next(iter(train(part)))  # never silently overwrites a run

    progress = list(train(part, resume=True))
    steps = [p.done for p in progress]
    assert steps[:2] == [27, 28] and steps[-1] == 40  # 27: the "loading data" report
    assert progress[-1].payload.best_val is not None
    a, b = weights(tmp_path / "full" / LAST), weights(tmp_path / "part" / LAST)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    rows = metric_rows(tmp_path / "part")
    logged = [int(r["step"]) for r in rows if r["loss"]]
    assert logged == [10, 20, 30, 40]


def test_keyboard_interrupt_leaves_resumable_checkpoint(glyphs: Path, tmp_path: Path) -> None:
    cfg = small_config(glyphs, tmp_path / "run", val_every=100)
    gen = train(cfg)
    for p in gen:
        if p.done == 13:
            break
    with pytest.raises(KeyboardInterrupt):
        gen.throw(KeyboardInterrupt)
    _, meta = load_train_state(tmp_path / "run" / RESUME)
    assert meta["step"] == 13
    result = run_to_end(cfg, resume=True)
    assert result.step == 40


def test_resume_without_state_is_a_user_error(glyphs: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="nothing to resume"):
        next(iter(train(small_config(glyphs, tmp_path / "none"), resume=True)))


def test_missing_path_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_data"
    with pytest.raises(UserError, match="no_such_data"):
        list(train(small_config(missing, tmp_path / "run")))
    assert not (tmp_path / "run").exists()


def test_too_few_classes(glyphs: Path, tmp_path: Path) -> None:
    few = tmp_path / "few"
    for name in ("glyph00", "glyph01", "glyph02"):
        shutil.copytree(glyphs / name, few / name)
    with pytest.raises(UserError, match="at least 5 classes, but there are 3"):
        list(train(small_config(few, tmp_path / "run", split="none")))
    with pytest.raises(UserError, match="too few"):
        list(train(small_config(few, tmp_path / "run2")))


def test_class_with_too_few_images_is_named(glyphs: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(glyphs, data)
    for f in sorted((data / "glyph07").iterdir())[3:]:
        f.unlink()
    with pytest.raises(UserError, match="glyph07") as e:
        list(train(small_config(data, tmp_path / "run", split="none")))
    assert "3 images" in str(e.value) and "\n" not in str(e.value)


def test_corrupt_files_are_skipped_with_a_warning(glyphs: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(glyphs, data)
    (data / "glyph03" / "broken.png").write_bytes(b"not a png at all")
    (data / "glyph05" / "empty.png").write_bytes(b"")
    cfg = small_config(data, tmp_path / "run", episodes=5, val_every=5, val_episodes=5)
    with pytest.warns(UserWarning, match="broken.png") as rec:
        result = run_to_end(cfg)
    assert any("empty.png" in str(w.message) for w in rec)
    assert result.step == 5
    assert sorted(Path(m).name for m, _ in result.skipped) == ["broken.png", "empty.png"]


def test_group_and_file_splits(glyphs: Path, tmp_path: Path) -> None:
    nested = tmp_path / "nested"
    make_glyphs(nested, n_classes=16, n_per_class=8, nested=True)
    cfg = small_config(nested, tmp_path / "run", split="groups", val_fraction=0.25)
    data = prepare_data(cfg, torch.device("cpu"))
    val_groups = {n.split("/")[0] for n in data.val_classes}
    train_groups = {n.split("/")[0] for n in data.train_classes}
    assert val_groups and not val_groups & train_groups

    listing = tmp_path / "val.txt"
    listing.write_text("# held out\nglyph01\nglyph02\nglyph03\nglyph04\nglyph05\n")
    cfg = small_config(glyphs, tmp_path / "run", split="files", val_classes=str(listing),
                       rotations=(0, 90))
    data = prepare_data(cfg, torch.device("cpu"))
    assert data.val_classes == [f"glyph0{i}" for i in range(1, 6)]
    assert len(data.train_classes) == 2 * 11  # rotations make new training classes
    assert "glyph00/rot090" in data.train_classes
    assert len(data.train.targets) == 2 * 11 * 10

    listing.write_text("glyph01\nnot_a_class\n")
    with pytest.raises(UserError, match="not_a_class"):
        prepare_data(cfg, torch.device("cpu"))


def test_vinyals_style_split_with_rotation_classes(tmp_path: Path) -> None:
    """Split files name rotated classes ("<class>/rot090"), spread over two datasets."""
    a, b = tmp_path / "background", tmp_path / "evaluation"
    make_glyphs(a, n_classes=8, n_per_class=6, nested=True, seed=3)
    names_b = make_glyphs(b, n_classes=4, n_per_class=6, seed=4)
    splits = tmp_path / "splits"
    splits.mkdir()
    train_bases = [f"group{c % 4}/glyph{c:02d}" for c in range(6)]
    val_bases = ["group2/glyph06", "group3/glyph07", *names_b]
    rots = ("rot000", "rot090", "rot180", "rot270")
    (splits / "vinyals_train.txt").write_text(
        "".join(f"{n}/{r}\n" for n in train_bases for r in rots))
    (splits / "vinyals_val.txt").write_text(
        "".join(f"{n}/{r}\n" for n in val_bases for r in rots[:2]))
    cfg = small_config(a, tmp_path / "run", split="vinyals", splits_dir=str(splits))
    with pytest.raises(UserError, match="glyph"):  # the val split names classes of b
        prepare_data(cfg, torch.device("cpu"))
    cfg = cfg.with_(data=(str(a), str(b)), val_query=2)
    data = prepare_data(cfg, torch.device("cpu"))
    assert len(data.train_classes) == 6 * 4 and len(data.val_classes) == 6 * 2
    assert "group1/glyph05/rot270" in data.train_classes
    assert "glyph02/rot090" in data.val_classes
    assert len(data.val.targets) == 6 * 2 * 6
    # a rotated class really is the rotated images
    t = data.train
    i0 = t.class_names.index("group1/glyph05/rot000")
    i90 = t.class_names.index("group1/glyph05/rot090")
    x0 = t.images[t.targets == i0]
    x90 = t.images[t.targets == i90]
    assert torch.equal(torch.rot90(x0, 1, dims=(2, 3)), x90)
    assert run_to_end(cfg.with_(episodes=2, val_every=2, val_episodes=2)).step == 2


def test_augmentation_on_the_device_trains(glyphs: Path, tmp_path: Path) -> None:
    cfg = small_config(glyphs, tmp_path / "run", augment="omniglot", episodes=3, val_every=3,
                       val_episodes=3)
    assert run_to_end(cfg).step == 3


def test_config_json_round_trip() -> None:
    cfg = TrainConfig(data=("a.zip", "b"), method_kwargs={"distance": "cosine"},
                      rotations=(0, 90, 180, 270), val_query=None, time_limit_s=3.5)
    again = TrainConfig.from_json(cfg.to_json())
    assert again == cfg
    assert TrainConfig.from_dict({**cfg.to_dict(), "from_the_future": 1}) == cfg


def test_lr_schedules() -> None:
    cos = TrainConfig(lr=1e-3, episodes=100, schedule="cosine", min_lr_ratio=0.0)
    assert lr_at(cos, 0) == pytest.approx(1e-3)
    assert lr_at(cos, 50) == pytest.approx(0.5e-3)
    assert lr_at(cos, 100) == pytest.approx(0.0, abs=1e-12)
    step = TrainConfig(lr=1e-3, schedule="step", step_size=10, gamma=0.5)
    assert [lr_at(step, s) for s in (0, 9, 10, 25)] == pytest.approx([1e-3, 1e-3, 5e-4, 2.5e-4])
    warm = TrainConfig(lr=1e-3, warmup=4, schedule="constant")
    assert lr_at(warm, 0) == pytest.approx(2.5e-4) and lr_at(warm, 10) == pytest.approx(1e-3)


def test_fit_schedule_follows_time_or_steps_whichever_is_further() -> None:
    fit = TrainConfig(lr=1e-3, episodes=100, schedule="cosine", min_lr_ratio=0.0,
                      time_limit_s=60.0, fit_schedule=True)
    assert lr_at(fit, 10, time_fraction=0.5) == pytest.approx(0.5e-3)  # time is ahead
    assert lr_at(fit, 50, time_fraction=0.1) == pytest.approx(0.5e-3)  # steps are ahead
    assert lr_at(fit, 10, time_fraction=1.0) == pytest.approx(0.0, abs=1e-12)
    plain = fit.with_(fit_schedule=False)
    assert lr_at(plain, 10, time_fraction=1.0) == pytest.approx(lr_at(plain, 10))
    with pytest.raises(UserError, match="time-limit"):
        fit.with_(time_limit_s=None, data=("x",)).validate()


@pytest.mark.parametrize("method", ["protonet", "relation", "maml"])
def test_every_method_trains_and_checkpoints(method: str, glyphs: Path, tmp_path: Path) -> None:
    if method not in METHODS:
        pytest.skip(f"{method} not registered")
    kwargs: dict[str, object] = {}
    bkw: dict[str, object] = {"hidden": 16}
    meta_batch = 1
    if method == "maml":
        kwargs = {"inner_steps": 2}
        bkw = {"hidden": 16, "track_running_stats": False}
        meta_batch = 2
    if method == "relation":
        bkw = {"hidden": 16, "pool_layers": 2}
    cfg = small_config(glyphs, tmp_path / "run", method=method, method_kwargs=kwargs,
                       backbone_kwargs=bkw, meta_batch=meta_batch, episodes=4, val_every=4,
                       val_episodes=4, log_every=2)
    result = run_to_end(cfg)
    assert result.best_val is not None and 0.0 <= result.best_val.accuracy <= 1.0
    first = load_file(str(tmp_path / "run" / LAST))
    assert all(math.isfinite(float(v.float().abs().sum())) for v in first.values())
    model = load_checkpoint(tmp_path / "run" / BEST).build()
    assert model.method_name == method


def test_compile_runs_the_step_through_torch_compile(glyphs: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """``compile=True`` trains through ``torch.compile`` (default mode off CUDA), and the
    model it trains is the one checkpointed. torch.compile itself is replaced by a recorder
    (compiling takes ~40 s here); benchmarks/train_speed.py --compile times the real one."""
    calls: list[tuple[torch.nn.Module, str]] = []

    def recording_compile(module: torch.nn.Module, mode: str = "default") -> torch.nn.Module:
        calls.append((module, mode))
        return module

    monkeypatch.setattr(torch, "compile", recording_compile)
    cfg = small_config(glyphs, tmp_path / "run", backbone_kwargs={"hidden": 8}, episodes=3,
                       val_every=3, val_episodes=2, log_every=1, compile=True)
    result = run_to_end(cfg)
    assert [mode for _, mode in calls] == ["default"]
    assert result.step == 3
    trained = load_checkpoint(tmp_path / "run" / LAST).state_dict
    assert all(torch.equal(trained[k], v.cpu()) for k, v in result.model.state_dict().items())


@pytest.mark.parametrize("method", ["protonet", "relation", "maml"])
def test_known_n_way_gives_the_same_loss_as_inferring_it(method: str, tmp_path: Path) -> None:
    """The trainer passes its ``way`` to ``meta_loss`` (no device sync to infer it from the
    labels); the loss, accuracy and gradients must be those of the inferring path."""
    from fewshot_studio.data.sampler import EpisodeSampler
    from fewshot_studio.training.distributed import DistInfo, wrap
    from fewshot_studio.training.steps import train_step

    if method not in METHODS:
        pytest.skip(f"{method} not registered")
    kwargs: dict[str, object] = {"inner_steps": 1} if method == "maml" else {}
    bkw: dict[str, object] = {"hidden": 8}
    if method == "maml":
        bkw["track_running_stats"] = False
    cfg = small_config(tmp_path, tmp_path / "run", method=method, method_kwargs=kwargs,
                       backbone_kwargs=bkw)
    torch.manual_seed(0)
    model, _ = build_model(cfg)
    pre = cfg.preprocess
    images = torch.randint(0, 256, (8 * 4, pre.channels, pre.image_size, pre.image_size),
                           dtype=torch.uint8)
    targets = torch.arange(8).repeat_interleave(4)
    gen = torch.Generator().manual_seed(0)
    batch = BatchMaker(images, pre, "none", gen)(
        EpisodeSampler(targets, 5, 1, 3, seed=0).sample_batch(2))

    def loss_and_grads(n_way: int | None) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        loss, acc = model.meta_loss(*batch, n_way=n_way)
        loss.backward()
        return loss.detach(), acc, [p.grad.clone() for p in model.parameters()
                                    if p.grad is not None]

    inferred, known = loss_and_grads(None), loss_and_grads(5)
    assert torch.equal(inferred[0], known[0]) and torch.equal(inferred[1], known[1])
    assert len(inferred[2]) == len(known[2]) > 0
    assert all(torch.equal(a, b) for a, b in zip(inferred[2], known[2], strict=True))

    seen: list[int | None] = []
    step_module = wrap(model, DistInfo(device=torch.device("cpu")))
    real = model.meta_loss

    def spy(*args: torch.Tensor, n_way: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        seen.append(n_way)
        return real(*args, n_way=n_way)

    model.meta_loss = spy  # type: ignore[method-assign]
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    train_step(step_module, opt, batch, n_way=5)
    train_step(step_module, opt, batch)
    assert seen == [5, None]


def test_run_state_round_trips_through_the_resume_file(tmp_path: Path) -> None:
    from fewshot_studio.training.evaluate import EvalResult
    from fewshot_studio.training.train_state import RunState, model_state

    model, _ = build_model(TrainConfig(backbone_kwargs={"hidden": 4}))
    opt = torch.optim.Adam(model.parameters())
    val = EvalResult(0.75, 0.02, 60, [0.5, 1.0], 5, 1, 5, 1)
    state = RunState(step=12, best_acc=0.75, best_val=val, elapsed_before=3.0)
    path = tmp_path / RESUME
    state.save(path, model, opt, config={"way": 5}, elapsed_s=4.5, sampler_states=[None],
               world_size=1, rng_states=[torch.Generator().get_state()])
    tensors, meta = load_train_state(path)
    back = RunState.from_saved(meta)
    assert (back.step, back.best_acc, back.elapsed_before) == (12, 0.75, 4.5)
    assert back.best_val == EvalResult(0.75, 0.02, 60, [], 5, 1, 5, 1)  # no per-episode list
    assert meta["config"] == {"way": 5} and meta["world_size"] == 1
    weights = model_state(tensors)
    assert weights.keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(weights[k], v), k
    assert RunState.from_saved({"step": 3}) == RunState(step=3)
