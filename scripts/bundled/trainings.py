"""Running ``fewshot-studio train`` for ``scripts/train_checkpoints.py``: the command, reusing
or resuming a run folder, a second phase, installing the result."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from bundled.budgets import CONTINUE, DESCRIPTIONS
from bundled.common import EXE, Ctx, hardware, install, sh, show, train_entry

from fewshot_studio.io.checkpoint import load_checkpoint


def train_cmd(name: str, args: list[str], data: list[str], out: Path,
              extra: Sequence[str] = ()) -> list[str]:
    return [*EXE, "train", *args, *extra, "--data", *data, "--out", str(out),
            "--name", name, "--description", DESCRIPTIONS.get(name, name)]


def run_training(ctx: Ctx, name: str, cmd: list[str], out: Path) -> Path:
    """Train ``name`` with ``cmd`` into ``out`` and return its best checkpoint; a run that
    already has one is reused (``--retrain``: start over; ``--resume``: continue it)."""
    best = out / "best.safetensors"
    if ctx.resume and (out / "resume.safetensors").exists():
        cmd = [*EXE, "train", "--resume", "--out", str(out), "--device", "auto"]
    elif best.exists() and not ctx.retrain:
        print(f"[{name}] {out} already trained; reusing it (--retrain to start over)")
        if train_entry(ctx.log, name) is None:  # started by hand with this command
            meta = load_checkpoint(best).training
            ctx.log.add(name, {"kind": "train", "cmd": show(cmd),
                               "wall_s": meta.get("wall_time_s"), "hardware": hardware(),
                               "steps": meta.get("step")})
        return best
    if ctx.retrain and out.exists():
        shutil.rmtree(out)
    sh(ctx.log, name, cmd, ctx.runs / f"train_{name}.log")
    return best


def continue_training(ctx: Ctx, name: str, out: Path) -> None:
    """The second phase in :data:`CONTINUE` for this budget, unless the run already has the
    episodes it asks for (``--episodes``, else the first phase's)."""
    more = CONTINUE.get(name, {}).get(ctx.budget)
    if not more:
        return
    meta = load_checkpoint(out / "last.safetensors").training
    total = int(more[more.index("--episodes") + 1]) if "--episodes" in more else \
        int(meta.get("config", {}).get("episodes", 0))
    if meta.get("step", 0) < total:
        sh(ctx.log, name, [*EXE, "train", "--resume", "--out", str(out), "--device", "auto",
                           *more], ctx.runs / f"train_{name}.log")


def install_trained(best: Path, target: Path) -> None:
    """Install ``best`` as ``target``, unless ``target`` already is that training (then its
    recorded evaluations stay)."""
    if target.exists() and load_checkpoint(target).training == load_checkpoint(best).training:
        return
    install(best, target)
