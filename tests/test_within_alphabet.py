"""Lake et al.'s within-alphabet one-shot protocol (issue 16): ``eval --within-alphabet`` and
the training option that mixes such hard episodes in, on tiny generated Omniglot-like
folders (``alphaK/charNN/<cid>_<drawer>.png``)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_data import make_alphabet_folder, make_class_folder
from fixtures_train import one_thread  # noqa: F401 (autouse fixture)

from fewshot_studio.cli import main
from fewshot_studio.data.preprocess import Preprocess
from fewshot_studio.data.splits import alphabet_of, drawer_of
from fewshot_studio.errors import UserError
from fewshot_studio.io.checkpoint import Checkpoint, load_checkpoint, read_metadata, save_checkpoint
from fewshot_studio.models import create_method, model_spec
from fewshot_studio.models.backbones import Conv4
from fewshot_studio.training.config import TrainConfig
from fewshot_studio.training.evaluate import fixed_episode_sampler
from fewshot_studio.training.train_data import load_eval_images

PRE = Preprocess(image_size=28, channels=1)


@pytest.fixture(scope="module")
def alphabets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("alphabets") / "letters"
    make_alphabet_folder(root, chars_per_alphabet=(4, 3, 2), n_drawers=5)
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    backbone = Conv4(1, 28, hidden=8)
    model = create_method("protonet", backbone)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors", Checkpoint(
        model=model_spec(model, "conv4", backbone.config()), preprocess=PRE,
        state_dict=model.state_dict(), name="tiny"))


def test_names_give_alphabet_and_drawer() -> None:
    assert alphabet_of("Angelic/character01/rot090") == "Angelic"
    assert alphabet_of("glyph01") is None
    assert drawer_of("images_evaluation/Angelic/character01/0965_17.png") == 17
    assert drawer_of("alpha0/char00/003.png") is None


def test_episodes_share_one_alphabet_and_split_drawers(alphabets: Path) -> None:
    images = load_eval_images([str(alphabets)], PRE)
    drawers = np.array([drawer_of(f) for f in images.files])
    eps, query, sampler = fixed_episode_sampler(images, 3, 1, None, 60, seed=0,
                                                within_alphabet=True)
    assert query == 4  # 5 drawers - 1 shot
    assert sampler.groups_used == ["alpha0", "alpha1"] and sampler.groups_skipped == ["alpha2"]
    for ep in eps:
        assert len({alphabet_of(images.class_names[c]) for c in ep.classes.tolist()}) == 1
        assert (images.targets[ep.support] == ep.classes).all()
        s_dr, q_dr = set(drawers[ep.support.numpy()]), set(drawers[ep.query.numpy()])
        assert len(s_dr) == 1 and len(q_dr) == query and not s_dr & q_dr
    again, _, _ = fixed_episode_sampler(images, 3, 1, None, 60, seed=0, within_alphabet=True)
    assert all(torch.equal(a.query, b.query) for a, b in zip(eps, again, strict=True))


LINE = re.compile(r"^accuracy: \d+\.\d\d% \+- \d+\.\d\d% \(95% CI, 20 episodes, within one "
                  r"alphabet \(2 alphabets\), support and query by different drawers\)$", re.M)


def test_eval_command_within_alphabet(alphabets: Path, checkpoint: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    args = ["eval", "--checkpoint", str(checkpoint), "--data", str(alphabets), "--way", "3",
            "--shot", "1", "--episodes", "20", "--device", "cpu", "--within-alphabet"]
    assert main([*args, "--unknown-threshold"]) == 0
    cap = capsys.readouterr()
    first = LINE.search(cap.out)
    assert first
    assert re.search(r"^unknown at threshold 0\.55: \d+\.\d\d% of the queries$", cap.out, re.M)
    assert "2 alphabets with at least 3 classes; skipped 1: alpha2" in cap.err
    assert main([*args, "--write-results", "--label", "letters"]) == 0
    assert LINE.search(capsys.readouterr().out).group(0) == first.group(0)  # deterministic
    rec = read_metadata(checkpoint)["evaluation"]["letters within-alphabet 3w1s"]
    assert rec["protocol"] == "within-alphabet" and rec["alphabets"] == 2
    assert rec["different_drawers"] is True and rec["query"] == 4


def test_eval_command_without_enough_classes_or_alphabets(
        alphabets: Path, checkpoint: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    base = ["eval", "--checkpoint", str(checkpoint), "--episodes", "5", "--device", "cpu",
            "--within-alphabet"]
    assert main([*base, "--data", str(alphabets), "--way", "5"]) == 2
    err = capsys.readouterr().err
    assert "no group (alphabet) has 5 classes" in err and "'alpha0', has 4" in err
    assert err.count("\n") == 1
    flat = tmp_path / "flat"
    make_class_folder(flat, n_classes=4, n_per_class=4, size=28, mode="L")
    assert main([*base, "--data", str(flat), "--way", "3"]) == 2
    assert "nested class folders" in capsys.readouterr().err
    with pytest.raises(UserError, match="no group"):
        fixed_episode_sampler(load_eval_images([str(alphabets)], PRE), 5, 1, 1, 1, 0, True)


def test_training_mixes_within_alphabet_episodes(alphabets: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(["train", "--method", "protonet", "--backbone", "conv4", "--backbone-arg",
                 "hidden=8", "--data", str(alphabets), "--split", "groups",
                 "--val-classes", "0.3", "--way", "3", "--shot", "1", "--query", "2",
                 "--episodes", "6", "--val-every", "3", "--val-episodes", "4", "--val-way",
                 "2", "--val-within-alphabet", "--within-alphabet-fraction", "0.5",
                 "--device", "cpu", "--out", str(out), "--log-every", "3"]) == 0
    assert "trained 6 episodes" in capsys.readouterr().out
    ckpt = load_checkpoint(out / "best.safetensors")
    cfg = TrainConfig.from_dict(ckpt.training["config"])
    assert cfg.within_alphabet_fraction == 0.5 and cfg.val_within_alphabet
    assert ckpt.evaluation["validation 2w1s within-alphabet"]["protocol"] == "within-alphabet"
    assert TrainConfig.from_dict({"way": 5}).within_alphabet_fraction == 0.0  # old configs
    with pytest.raises(UserError, match="within-alphabet-fraction"):
        TrainConfig(data=("x",), within_alphabet_fraction=2.0).validate()
