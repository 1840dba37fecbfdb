"""``fewshot-studio train``: a run end to end, --resume, the progress bar, split options and
one-line errors with a non-zero exit."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures_train import make_glyphs, one_thread  # noqa: F401 (autouse fixture)

from fewshot_studio.cli import main
from fewshot_studio.io.checkpoint import load_checkpoint
from fewshot_studio.training.config import TrainConfig
from fewshot_studio.training.trainer import RESUME, load_train_state

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def glyphs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli_glyphs")
    make_glyphs(root, n_classes=12, n_per_class=8, seed=1)
    return root


def base_args(data: Path, out: Path) -> list[str]:
    return ["train", "--method", "protonet", "--backbone", "conv4", "--backbone-arg",
            "hidden=16", "--data", str(data), "--way", "4", "--shot", "1", "--query", "3",
            "--episodes", "12", "--val-every", "6", "--val-episodes", "10", "--val-way", "3",
            "--device", "cpu", "--out", str(out), "--log-every", "3"]


def test_train_then_resume(glyphs: Path, tmp_path: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main([*base_args(glyphs, out), "--val-classes", "0.3", "--rotations", "0", "180",
                 "--method-arg", "distance=cosine"]) == 0
    cap = capsys.readouterr()
    assert "trained 12 episodes" in cap.out and "best validation accuracy:" in cap.out
    assert "12/12" in cap.err and "ETA" in cap.err and "loss=" in cap.err  # the progress bar
    ckpt = load_checkpoint(out / "best.safetensors")
    cfg = TrainConfig.from_dict(ckpt.training["config"])
    assert cfg.rotations == (0, 180) and cfg.val_fraction == 0.3
    assert ckpt.model["method_config"]["distance"] == "cosine"
    assert ckpt.preprocess.image_size == 28 and ckpt.preprocess.channels == 1

    # again without --resume: refused, nothing overwritten
    assert main(base_args(glyphs, out)) == 2
    assert "--resume" in capsys.readouterr().err
    # extend the run to 18 episodes
    assert main(["train", "--resume", "--out", str(out), "--episodes", "18",
                 "--device", "cpu"]) == 0
    assert "trained 18 episodes" in capsys.readouterr().out
    _, meta = load_train_state(out / RESUME)
    assert meta["step"] == 18
    assert TrainConfig.from_dict(meta["config"]).rotations == (0, 180)  # the run's own config


def test_class_list_split(glyphs: Path, tmp_path: Path) -> None:
    listing = tmp_path / "val.txt"
    listing.write_text("glyph00\nglyph01\nglyph02\n")
    out = tmp_path / "run"
    assert main([*base_args(glyphs, out), "--val-classes", str(listing),
                 "--fp16-checkpoints"]) == 0
    cfg = TrainConfig.from_dict(load_checkpoint(out / "last.safetensors").training["config"])
    assert cfg.split == "files" and cfg.val_classes == str(listing)
    assert load_checkpoint(out / "last.safetensors").training["train_classes"] == 9
    from safetensors import safe_open

    for name in ("best.safetensors", "last.safetensors"):
        with safe_open(str(out / name), framework="pt") as f:
            dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118
        assert "F16" in dtypes and "F32" not in dtypes
    with safe_open(str(out / RESUME), framework="pt") as f:  # resume state stays float32
        assert f.get_slice("model.backbone.encoder.0.0.weight").get_dtype() == "F32"


def test_bad_inputs_exit_2_with_one_line(glyphs: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert main(base_args(tmp_path / "missing_dir", tmp_path / "a")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "missing_dir" in err[-1]

    few = tmp_path / "few"
    for name in ("glyph00", "glyph01"):
        shutil.copytree(glyphs / name, few / name)
    assert main([*base_args(few, tmp_path / "b"), "--split", "none"]) == 2
    assert "at least 4 classes" in capsys.readouterr().err

    short = tmp_path / "short"
    shutil.copytree(glyphs, short)
    for f in sorted((short / "glyph05").iterdir())[2:]:
        f.unlink()
    assert main([*base_args(short, tmp_path / "c"), "--split", "none"]) == 2
    assert "glyph05" in capsys.readouterr().err

    with pytest.raises(SystemExit) as exit_info:  # argparse: --method reads the registry
        main([*base_args(glyphs, tmp_path / "d"), "--method", "nonsense"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'nonsense'" in err and "'maml', 'protonet', 'relation'" in err
    assert not (tmp_path / "d").exists()


def test_method_and_backbone_choices_and_preprocessing_come_from_the_registries(
        capsys: pytest.CaptureFixture[str]) -> None:
    from fewshot_studio.cli.train import BACKBONE_NAMES, METHOD_NAMES, default_preprocess
    from fewshot_studio.data.preprocess import Preprocess
    from fewshot_studio.models import BACKBONES, METHODS
    from fewshot_studio.models.registry import BackboneCfg

    assert list(METHOD_NAMES) == METHODS.names()
    assert list(BACKBONE_NAMES) == [e.name for e in BACKBONES.entries() if e.cfg.trainable]
    assert "onnx" in BACKBONES and "onnx" not in BACKBONE_NAMES  # a graph has no gradients
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "a registered method: maml, protonet, relation" in help_text
    assert "a registered trainable backbone: conv4, efficientnet_lite0, resnet12" in help_text
    for name in BACKBONES.names():  # the defaults are the entry's own
        assert default_preprocess(name) == BACKBONES.get(name).cfg.preprocess
    assert default_preprocess("resnet12") == Preprocess(84, 3, (0.5,) * 3, (0.5,) * 3,
                                                        "center_crop")
    assert default_preprocess("conv4", image_size=32, channels=3) == Preprocess(
        32, 3, (0.5,) * 3, (0.5,) * 3, "center_crop")  # another channel count: generic
    assert default_preprocess("efficientnet_lite0", mean=[0.4]).mean == (0.4,)
    # a backbone registered with its own preprocessing gets it, no code here changes
    BACKBONES.register("_test_only", cfg=BackboneCfg(Preprocess(40, 1, (0.2,), (0.3,))))(
        lambda **kw: None)
    try:
        assert default_preprocess("_test_only") == Preprocess(40, 1, (0.2,), (0.3,))
        assert "_test_only" in BACKBONE_NAMES
    finally:
        BACKBONES._entries.pop("_test_only")


def test_entry_point_error_has_no_traceback(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "fewshot_studio", *base_args(tmp_path / "nothing_here",
                                                           tmp_path / "run")],
        capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "nothing_here" in proc.stderr


def test_demo_without_data_says_where_it_looked(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from fewshot_studio.cli.demo import run_headless_demo

    monkeypatch.setenv("FEWSHOT_DATA", str(tmp_path))
    assert run_headless_demo() == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "omniglot") in err and "FEWSHOT_DATA" in err
    assert err.count("\n") == 1


def test_ctrl_c_leaves_a_resumable_checkpoint(glyphs: Path, tmp_path: Path) -> None:
    import signal
    import time

    out = tmp_path / "run"
    args = base_args(glyphs, out)
    args[args.index("--episodes") + 1] = "100000"
    args[args.index("--val-every") + 1] = "100000"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "fewshot_studio", *args, "--log-every",
                             "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            metrics = out / "metrics.csv"
            if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
                break
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "--resume" in err
    _, meta = load_train_state(out / RESUME)
    assert 4 <= meta["step"] < 100000
    assert load_checkpoint(out / "last.safetensors").training["step"] == meta["step"]
