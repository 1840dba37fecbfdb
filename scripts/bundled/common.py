"""The shared ground of ``scripts/train_checkpoints.py``: where the data, the CLI and the
checkpoints are, the protocols, the command log and running a logged command."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fewshot_studio.data.preprocess import Preprocess

REPO = Path(__file__).resolve().parents[2]
CKPT_DIR = REPO / "checkpoints"  # the default; Ctx.checkpoints is the one used
SPLITS_DIR = REPO / "resources" / "splits"
VENV_EXE = REPO / ".venv" / "bin" / "fewshot-studio"
# The CLI: the repo's virtual environment, else this interpreter (a machine without one,
# e.g. a lent GPU machine running the repo from its working tree).
EXE = [str(VENV_EXE)] if VENV_EXE.exists() else [sys.executable, "-m", "fewshot_studio"]
LITE0_PRE = Preprocess(224, 3, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "center_crop")
OMNIGLOT_PROTOCOLS = ((5, 1), (5, 5), (20, 1), (20, 5))
OMNIGLOT_PROTOCOL_NAMES = tuple(f"{w}w{k}s" for w, k in OMNIGLOT_PROTOCOLS)
NATURAL_PROTOCOLS = ((5, 1), (5, 5))
# Lake et al. (2015)'s harder one-shot test (issue 16): every episode's classes from one
# images_evaluation alphabet, support and query by different drawers (`eval --within-alphabet`)
WITHIN_ALPHABET_PROTOCOLS = ((20, 1),)
WITHIN_ALPHABET_TARGETS = {"each": 0.94, "best": 0.955}  # issue 16: error <= 6 %, best <= 4.5 %
EVAL_EPISODES = 1000
BASELINE_DESCRIPTION = ("ImageNet-pretrained EfficientNet-Lite0, nearest-centroid, not "
                        "meta-trained (cosine similarity of average-pooled 1280-d features)")


def data_dir() -> Path:
    return Path(os.environ.get("FEWSHOT_DATA", REPO.parent / "shared" / "data")).resolve()


def omniglot(which: str) -> str:
    return str(data_dir() / "omniglot" / f"images_{which}.zip")


def caltech() -> str:
    return str(data_dir() / "caltech101" / "caltech101.zip")


def natural_eval_sets() -> dict[str, tuple[str, str | None]]:
    """label -> (dataset, class list or None)."""
    return {
        "caltech101-test": (caltech(), str(SPLITS_DIR / "caltech101_test.txt")),
        "gtsrb": (str(data_dir() / "gtsrb" / "gtsrb_subset.zip"), None),
        "cifar10": (str(data_dir() / "cifar10" / "cifar10_subset.zip"), None),
    }


def hardware() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    model = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in out.splitlines()
                     if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    return f"CPU: {model}, {os.cpu_count()} cores"


# ---------------------------------------------------------------------------------------
# command log
# ---------------------------------------------------------------------------------------
class Log:
    """runs/bundled-<budget>/commands.json: name -> list of {cmd, wall_s, hardware, ...}."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}

    def add(self, name: str, entry: dict[str, Any], replace: bool = False) -> None:
        """Add ``entry`` under ``name`` (read-modify-write under a file lock: steps may run
        as concurrent processes sharing one log)."""
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.path.is_file():  # another process may have added some
                self.data = json.loads(self.path.read_text())
            entries = [] if replace else self.data.get(name, [])
            entries = [e for e in entries if e.get("cmd") != entry.get("cmd")] + [entry]
            self.data[name] = entries
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True))
            tmp.replace(self.path)


def show(cmd: Sequence[str]) -> str:
    """A command as the card shows it: repo-relative executables, $DATA for the data dir."""
    text = " ".join(shlex.quote(c) for c in cmd)
    text = text.replace(" ".join(map(shlex.quote, EXE)), ".venv/bin/fewshot-studio")
    text = text.replace(str(REPO / ".venv" / "bin") + "/", ".venv/bin/")
    text = text.replace(str(data_dir()), "$DATA").replace(str(REPO) + "/", "")
    return text


def sh(log: Log, name: str, cmd: list[str], logfile: Path | None = None,
       kind: str = "train") -> subprocess.CompletedProcess[str]:
    print(f"[{name}] $ {show(cmd)}", flush=True)
    t0 = time.time()
    env = dict(os.environ)
    if logfile is not None:
        with logfile.open("a") as f:
            f.write(f"\n$ {show(cmd)}\n")
            f.flush()
            proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                  text=True)
        out = ""
    else:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        out = proc.stdout + proc.stderr
        print(out.strip().splitlines()[-1] if out.strip() else "", flush=True)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"[{name}] failed (exit {proc.returncode}): {show(cmd)}\n{out[-2000:]}")
    log.add(name, {"kind": kind, "cmd": show(cmd), "wall_s": round(wall, 1),
                   "hardware": hardware(), "finished": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                     time.gmtime())})
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def train_entry(log: Log, name: str) -> dict[str, Any] | None:
    """The last training logged under ``name`` (None if none)."""
    entries = [e for e in log.data.get(name, []) if e.get("kind") == "train"]
    return entries[-1] if entries else None


def install(src: Path, dst: Path) -> None:
    """Copy atomically (temp file + rename): readers never see half a checkpoint."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


class Ctx:
    """One run of the script: its budget, run folder, command log, where checkpoints are
    installed, and the command line's options."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.budget: str = args.budget
        self.checkpoints: Path = (Path(args.checkpoints).resolve()
                                  if args.checkpoints else CKPT_DIR)
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        self.runs: Path = Path(args.runs or REPO / "runs" / f"bundled-{args.budget}").resolve()
        self.runs.mkdir(parents=True, exist_ok=True)
        self.log = Log(self.runs / "commands.json")
        self.resume: bool = args.resume
        self.retrain: bool = args.retrain
        self.keep_existing: bool = args.keep_existing
        self.time_limit: float | None = args.time_limit
        self.threads: int = args.threads
        self.max_steps: int | None = args.max_steps
        self.reeval: bool = args.reeval

    def installed(self, name: str) -> Path:
        """Where the bundled checkpoint ``name`` is installed."""
        return self.checkpoints / f"{name}.safetensors"

    def eval_episodes(self, name: str, way: int) -> int:
        """Episodes per evaluation protocol (issue 5: 1000; set lower here for a quick look)."""
        return EVAL_EPISODES
