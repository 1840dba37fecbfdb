"""scripts/train_checkpoints.py's bookkeeping (its modules in scripts/bundled/): the shared
command log, reusing finished trainings, the gpu budget's time limit and the model card's
choice of command log; the cpu budget's cached-feature pieces."""

from __future__ import annotations

import importlib.util
import json
import multiprocessing as mp
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from fewshot_studio.data.preprocess import Preprocess
from fewshot_studio.io.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fewshot_studio.models import create_backbone, create_method, model_spec
from fewshot_studio.training.records import record_result, result_key

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "train_checkpoints.py"


def load_script() -> SimpleNamespace:
    """The script (it puts scripts/ on sys.path) and its modules, by name."""
    spec = importlib.util.spec_from_file_location("train_checkpoints_script", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    names = ("budgets", "card", "common", "evaluation", "natural", "trainings")
    return SimpleNamespace(script=module, **{n: importlib.import_module(f"bundled.{n}")
                                             for n in names})


@pytest.fixture(scope="module")
def tc() -> SimpleNamespace:
    return load_script()


def tiny_checkpoint(path: Path, out_dir: str, step: int) -> Path:
    bb = create_backbone("conv4", in_channels=1, image_size=28, hidden=4)
    model = create_method("protonet", bb)
    ckpt = Checkpoint(model=model_spec(model, "conv4", bb.config()),
                      preprocess=Preprocess(28, 1), state_dict=model.state_dict(),
                      training={"config": {"out": out_dir}, "step": step})
    return save_checkpoint(path, ckpt)


def _add_entries(path: str, who: int, n: int, start: Any) -> None:
    tc = load_script()
    log = tc.common.Log(Path(path))
    start.wait()  # every process writes at the same time
    for i in range(n):
        log.add(f"job{who}", {"kind": "eval", "cmd": f"cmd {i}"})


def test_concurrent_steps_lose_no_log_entry(tmp_path: Path) -> None:
    path = tmp_path / "commands.json"
    ctx = mp.get_context("spawn")
    start = ctx.Barrier(3)
    procs = [ctx.Process(target=_add_entries, args=(str(path), w, 40, start))
             for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    data = json.loads(path.read_text())
    assert {k: len(v) for k, v in data.items()} == {"job0": 40, "job1": 40, "job2": 40}


def ctx_for(tc: SimpleNamespace, runs: Path, **kw: Any) -> Any:
    args = SimpleNamespace(budget="gpu", runs=str(runs), resume=False, retrain=False,
                           keep_existing=False, time_limit=None, threads=1, max_steps=None,
                           reeval=False, checkpoints=str(runs / "installed"))
    vars(args).update(kw)
    return tc.common.Ctx(args)


def test_a_finished_training_is_reused_not_rerun(tc: SimpleNamespace, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A run folder brought back from a GPU lease has best.safetensors but no resume state:
    the step reuses it (and logs it) instead of training again."""
    runs = tmp_path / "bundled-gpu"
    out = runs / "omniglot-protonet"
    out.mkdir(parents=True)
    tiny_checkpoint(out / "best.safetensors", str(out), step=12)
    monkeypatch.setattr(tc.trainings, "sh", lambda *a, **k: pytest.fail("trained again"))
    ctx = ctx_for(tc, runs)
    best = tc.trainings.run_training(ctx, "omniglot-protonet", ["fewshot-studio", "train"], out)
    assert best == out / "best.safetensors"
    assert ctx.log.data["omniglot-protonet"][0]["steps"] == 12


def test_gpu_time_limit_override(tc: SimpleNamespace, tmp_path: Path) -> None:
    args = tc.budgets.OMNIGLOT_TRAIN["omniglot-relation"]["gpu"]
    assert args[args.index("--time-limit") + 1] == str(tc.budgets.LEASE_TRAIN_S)
    assert "--fit-schedule" in args
    changed = tc.budgets.schedule(ctx_for(tc, tmp_path / "r", time_limit=42.0), args)
    assert changed[changed.index("--time-limit") + 1] == "42"
    assert tc.budgets.schedule(ctx_for(tc, tmp_path / "r"), args) == args


def test_install_keeps_recorded_evaluations_of_the_same_training(tc: SimpleNamespace,
                                                                tmp_path: Path) -> None:
    best = tiny_checkpoint(tmp_path / "best.safetensors", "runs/x", step=5)
    target = tmp_path / "installed.safetensors"
    tc.trainings.install_trained(best, target)
    record_result(target, "omniglot-evaluation 5w1s", {"accuracy": 0.9})
    tc.trainings.install_trained(best, target)  # same training: the result stays
    assert "omniglot-evaluation 5w1s" in load_checkpoint(target).evaluation
    newer = tiny_checkpoint(tmp_path / "newer.safetensors", "runs/x", step=6)
    tc.trainings.install_trained(newer, target)  # another training replaces it
    assert load_checkpoint(target).evaluation == {}


def test_card_reads_the_log_of_the_run_that_trained_the_installed_checkpoint(
        tc: SimpleNamespace, tmp_path: Path) -> None:
    gpu, cpu = tmp_path / "bundled-gpu", tmp_path / "bundled-cpu"
    for d, hw in ((gpu, "H100"), (cpu, "CPU")):
        log = tc.common.Log(d / "commands.json")
        log.add("omniglot-maml", {"kind": "train", "cmd": f"train on {hw}", "hardware": hw})
    tc.common.Log(cpu / "commands.json").add("natural-maml", {"kind": "train", "cmd": "cached"})
    installed = load_checkpoint(tiny_checkpoint(tmp_path / "m.safetensors",
                                                   str(cpu / "omniglot-maml"), step=1))
    merged, used = tc.card.merged_log([gpu, cpu], {"omniglot-maml": installed})
    assert merged.data["omniglot-maml"][0]["hardware"] == "CPU"  # where it was trained
    assert merged.data["natural-maml"][0]["cmd"] == "cached"
    assert used == {"bundled-cpu"}
    merged, used = tc.card.merged_log([gpu, cpu], {})  # nothing installed: first folder wins
    assert merged.data["omniglot-maml"][0]["hardware"] == "H100"
    assert used == {"bundled-gpu", "bundled-cpu"}


@pytest.mark.parametrize("readout", ["head", "multilevel"])
def test_head_model_scores_cached_block_outputs_as_the_full_model(
        tc: SimpleNamespace, tmp_path: Path, readout: str) -> None:
    """The cpu budget trains and evaluates on cached stem+blocks outputs: the checkpoint's
    model with a HeadOnly backbone must give the full model's embeddings and logits."""
    import torch

    torch.manual_seed(0)
    bb = create_backbone("efficientnet_lite0", image_size=32, readout=readout)
    for m in bb.modules():  # a random Lite0's activations vanish: make them O(1)
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.fill_(1e-4)
    if bb.block_weight is not None:  # not the initial value: the checkpoint's must be used
        with torch.no_grad():
            bb.block_weight.fill_(1.3)
    model = create_method("protonet", bb, pool="avg", distance="cosine").eval()
    path = save_checkpoint(tmp_path / "m.safetensors", Checkpoint(
        model=model_spec(model, "efficientnet_lite0", bb.config()),
        preprocess=Preprocess(32, 3, (0.5,) * 3, (0.5,) * 3), state_dict=model.state_dict()))
    head = tc.natural.head_model(load_checkpoint(path))
    x = torch.randn(6, 3, 32, 32)
    labels = torch.tensor([0, 1, 2])
    with torch.no_grad():
        cached = bb.blocks(bb.stem(x))
        full, part = model.embed(x), head.embed(cached)
        torch.testing.assert_close(part, full, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(head.fit(part[:3], labels)(part[3:]),
                                   model.fit(full[:3], labels)(full[3:]))
    assert full.shape == (6, bb.out_channels)


@pytest.mark.parametrize(("method", "plain", "expected"), [
    ("protonet", True, ["", "--tta", "--transductive"]),
    ("protonet", False, ["--tta", "--transductive"]),
    ("maml", False, ["--tta"]),  # full MAML has no transductive refinement
])
def test_omniglot_eval_runs_each_test_time_variant_once(
        tc: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str,
        plain: bool, expected: list[str]) -> None:
    bb = create_backbone("conv4", in_channels=1, image_size=28, hidden=4,
                         track_running_stats=method != "maml")
    model = create_method(method, bb)
    path = save_checkpoint(tmp_path / "m.safetensors", Checkpoint(
        model=model_spec(model, "conv4", bb.config()), preprocess=Preprocess(28, 1),
        state_dict=model.state_dict()))
    # one result recorded already: not measured again
    record_result(path, result_key(tc.evaluation.tta_key("omniglot-evaluation"), 5, 1),
                  {"accuracy": 1})
    calls: list[list[str]] = []
    monkeypatch.setattr(tc.evaluation, "sh", lambda log, name, cmd, **k: calls.append(cmd))
    tc.evaluation.omniglot_eval(ctx_for(tc, tmp_path / "runs"), "m", path, plain=plain)
    variants = [next((a for a in ("--tta", "--transductive") if a in c), "") for c in calls]
    per_protocol = len(tc.common.OMNIGLOT_PROTOCOLS)
    assert variants == [v for v in expected for _ in range(per_protocol)
                        if not (v == "--tta" and _ == 0)]


def test_within_alphabet_protocol_is_evaluated_and_carded_only_when_recorded(
        tc: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 16: the Omniglot steps also run `eval --within-alphabet` (once); the card gets
    its section only from recorded results, so a card without them is unchanged."""
    path = tiny_checkpoint(tmp_path / "m.safetensors", "runs/x", step=1)
    calls: list[list[str]] = []
    monkeypatch.setattr(tc.evaluation, "sh", lambda log, name, cmd, **k: calls.append(cmd))
    tc.evaluation.within_alphabet_eval(ctx_for(tc, tmp_path / "runs"), "m", path)
    assert len(calls) == 1
    assert {"--within-alphabet", "--unknown-threshold", "--write-results"} <= set(calls[0])
    assert calls[0][calls[0].index("--way") + 1] == "20"

    lines: list[str] = []
    metas = {"omniglot-protonet": load_checkpoint(path)}
    tc.card.within_alphabet_section(lines.append, metas)
    assert lines == []  # nothing recorded: the card stays as it was
    record_result(path, "omniglot-evaluation within-alphabet 20w1s", {
        "accuracy": 0.96, "ci95": 0.004, "episodes": 1000, "unknown": 0.012,
        "unknown_threshold": 0.55})
    record_result(path, "omniglot-evaluation 20w1s", {"accuracy": 0.97, "ci95": 0.002,
                                                      "episodes": 1000})
    calls.clear()
    tc.evaluation.within_alphabet_eval(ctx_for(tc, tmp_path / "runs"), "m", path)
    assert calls == []  # recorded already
    metas = {"omniglot-protonet": load_checkpoint(path)}
    tc.card.within_alphabet_section(lines.append, metas)
    text = "\n".join(lines)
    assert "## Omniglot, within one alphabet (Lake et al. 2015)" in text
    assert ("| omniglot-protonet | 96.00 +- 0.40 | 4.00 % | 1.20 % at 0.55 | 97.00 +- 0.20 |"
            in text)
    assert "every checkpoint <= 6.0 % error: met; the best <= 4.5 % (better than people): met" \
        in text
