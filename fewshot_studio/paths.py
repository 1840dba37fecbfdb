"""Where things live: bundled checkpoints and resources (package data, never relative to the
working directory) and the user's data, cache and log directories (platformdirs)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import platformdirs

from fewshot_studio.errors import UserError

APP_NAME = "FewShotStudio"
CHECKPOINT_SUFFIX = ".safetensors"


def _package_dir(subpackage: str, repo_folder: str) -> Path:
    """An installed data sub-package if there is one, else the folder in the source tree."""
    try:
        return Path(str(resources.files(f"fewshot_studio.{subpackage}")))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / repo_folder


def checkpoints_dir() -> Path:
    """The folder of bundled checkpoints."""
    return _package_dir("checkpoints", "checkpoints")


def resources_dir() -> Path:
    """The folder of bundled resources (icons, demo project)."""
    return _package_dir("resources", "resources")


def bundled_checkpoints() -> dict[str, Path]:
    """Bundled checkpoints by name (file stem), sorted."""
    d = checkpoints_dir()
    if not d.is_dir():
        return {}
    return {p.stem: p for p in sorted(d.glob(f"*{CHECKPOINT_SUFFIX}"))}


def resolve_checkpoint(name_or_path: str) -> Path:
    """A bundled checkpoint's name (``omniglot-protonet``) or a path -> an existing file."""
    p = Path(name_or_path).expanduser()
    if p.is_file():
        return p
    bundled = bundled_checkpoints()
    if name_or_path in bundled:
        return bundled[name_or_path]
    known = ", ".join(bundled) or "none bundled"
    raise UserError(f"no checkpoint {name_or_path!r}: not a file, nor a bundled name ({known})")


def user_cache_dir() -> Path:
    return Path(platformdirs.user_cache_dir(APP_NAME, appauthor=False))


def user_data_dir() -> Path:
    return Path(platformdirs.user_data_dir(APP_NAME, appauthor=False))


def user_log_dir() -> Path:
    return Path(platformdirs.user_log_dir(APP_NAME, appauthor=False))
