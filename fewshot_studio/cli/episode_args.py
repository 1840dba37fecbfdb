"""The arguments shared by the subcommands that run fixed episodes of a checkpoint on
class-folder data (``eval``, ``calibrate``). Not a subcommand itself."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from fewshot_studio.io.checkpoint import Checkpoint
    from fewshot_studio.models.base import FewShotClassifier


def add_episode_args(p: argparse.ArgumentParser, classes_help: str, episodes: int) -> None:
    """``--checkpoint``, ``--data``, ``--classes``, ``--splits-dir``, ``--way``, ``--shot``,
    ``--query``, ``--episodes`` (default ``episodes``), ``--seed``, ``--device``."""
    p.add_argument("--checkpoint", required=True, help="a bundled name or a .safetensors file")
    p.add_argument("--data", action="append", nargs="+", required=True, metavar="PATH",
                   help="class-folder dataset: folder or .zip (repeatable)")
    p.add_argument("--classes", metavar="FILE|SPLIT",
                   help=f"{classes_help}: a file with one class per line or a split name "
                        "(e.g. vinyals_test)")
    p.add_argument("--splits-dir", help="folder of vinyals_*.txt (default: the shared data)")
    p.add_argument("--way", type=int, default=5,
                   help="classes per episode (default %(default)s)")
    p.add_argument("--shot", type=int, default=1,
                   help="examples per class in each episode (default %(default)s)")
    p.add_argument("--query", type=int, default=None,
                   help="queries per class (default: 15, or what the smallest class allows, "
                        "e.g. 20 - K on Omniglot for K > 5)")
    p.add_argument("--episodes", type=int, default=episodes,
                   help="number of fixed episodes (default %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the episode sampler: the same seed, the same episodes "
                        "(default %(default)s)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where the model runs (default %(default)s: CUDA when available)")


def data_paths(args: argparse.Namespace) -> list[str]:
    """The ``--data`` paths, flattened and with ``~`` expanded."""
    return [str(Path(x).expanduser()) for group in args.data for x in group]


def load_for_episodes(args: argparse.Namespace
                      ) -> tuple[Path, Checkpoint, FewShotClassifier, Any, torch.device]:
    """:func:`fewshot_studio.training.train_data.load_for_episodes` with the
    :func:`add_episode_args` arguments."""
    from fewshot_studio.training.train_data import load_for_episodes as load

    return load(args.checkpoint, data_paths(args), args.classes, args.splits_dir, args.device)
