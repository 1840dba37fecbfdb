"""Checked reading of JSON document fields and portable paths, shared by the project file
(:mod:`.project_io`) and its saved predictions (:mod:`.saved_predictions`). Qt-free."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fewshot_studio.errors import UserError


def rel_path(p: Path, base: Path) -> str:
    s, b = str(p), str(base)
    prefix = b if b.endswith(os.sep) else b + os.sep
    if s.startswith(prefix):  # the common case, without relpath's cost (300,000 paths)
        return s[len(prefix):].replace(os.sep, "/")
    try:
        return Path(os.path.relpath(p, base)).as_posix() if p.is_relative_to(base) else str(p)
    except ValueError:  # other drive on Windows
        return str(p)


def abs_path(s: str, base: str) -> Path:
    """``s`` (absolute, or relative to the folder ``base``) as an absolute, normalised path.
    String work only, no system call: loading 300,000 paths must not stat them all."""
    return Path(os.path.normpath(os.path.join(base, s)))


def show(v: object) -> str:
    """A short one-line repr of an untrusted value for a message."""
    text = " ".join(repr(v).split())
    return text if len(text) <= 40 else text[:37] + "..."


def typed(doc: dict[str, Any], key: str, kind: type | tuple[type, ...], what: str,
           default: Any, where: str) -> Any:
    """``doc[key]`` (``default`` when absent) checked to be ``kind``: UserError otherwise."""
    v = doc.get(key, default)
    if not isinstance(v, kind):
        raise UserError(f"{where}: '{key}' must be {what}, not {type(v).__name__}")
    return v
