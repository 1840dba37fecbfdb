"""Where things live: bundled checkpoints and resources (package data, never relative to the
working directory) and the user's data, cache and log directories (platformdirs)."""

from __future__ import annotations

import importlib.util
from importlib import resources
from pathlib import Path

import platformdirs

from fewshot_studio.errors import UserError

APP_NAME = "FewShotStudio"
CHECKPOINT_SUFFIX = ".safetensors"


def _package_dir(subpackage: str, repo_folder: str) -> Path:
    """An installed data sub-package if there is one, else the folder in the source tree.

    The data packages have no ``__init__.py`` (they are plain folders at the top of the
    repository, mapped into the package by pyproject.toml), so where they are installed they
    import as namespace packages, for which ``importlib.resources.files`` returns a
    ``MultiplexedPath`` (Python 3.11) rather than a ``Path``: its folder is then taken from the
    import spec. A source checkout or an editable install has no such package and uses the
    folder beside ``fewshot_studio/``; so does a frozen app that bundles it there.
    """
    name = f"fewshot_studio.{subpackage}"
    try:
        root = resources.files(name)
    except ModuleNotFoundError:
        root = None
    if isinstance(root, Path) and root.is_dir():
        return root
    if root is not None:
        spec = importlib.util.find_spec(name)
        for location in (spec.submodule_search_locations or []) if spec else []:
            if Path(location).is_dir():
                return Path(location)
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
