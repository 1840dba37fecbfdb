"""Shared tools of the bad-input suite (``tests/test_bad_inputs.py``): run the CLI in-process
and prove that no input file changed (every file under the given roots hashed before and
after).

    from bad_input_helpers import LabelEnv, run_cli, snapshot
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import pytest

from fewshot_studio.cli import main


def _digest(path: Path) -> str:
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        return f"link:{os.readlink(path)}"
    if not stat.S_ISREG(st.st_mode):
        return f"special:{stat.S_IFMT(st.st_mode)}"  # FIFO, socket...: never opened
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except PermissionError:
        return f"unreadable:{st.st_size}:{st.st_mtime_ns}"
    return h.hexdigest()


def snapshot(*roots: Path) -> dict[str, str]:
    """``{path: sha256 (or a tag for links and special files)}`` of every entry under
    ``roots`` (files given directly are hashed too). Folders are walked without following
    symlinks; unreadable folders are listed by name."""
    out: dict[str, str] = {}
    for root in roots:
        root = Path(root)
        if not root.exists() and not root.is_symlink():
            continue
        if not root.is_dir() or root.is_symlink():
            out[str(root)] = _digest(root)
            continue
        for dirpath, dirnames, filenames in os.walk(root, onerror=lambda e: None):
            for d in dirnames:
                p = Path(dirpath) / d
                if p.is_symlink():
                    out[str(p)] = _digest(p)
                elif not os.access(p, os.R_OK | os.X_OK):
                    out[str(p)] = "unreadable-folder"
            for f in filenames:
                p = Path(dirpath) / f
                out[str(p)] = _digest(p)
    return out


@dataclass
class CliResult:
    code: int
    out: str
    err: str


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str | os.PathLike[str]) -> CliResult:
    """``fewshot-studio ARGV`` in-process: exit code and what it printed."""
    capsys.readouterr()
    code = main([os.fspath(a) for a in argv])
    captured = capsys.readouterr()
    return CliResult(code, captured.out, captured.err)


@dataclass
class LabelEnv:
    """A tiny checkpoint, a support folder (red/green/blue) and a query folder, built by the
    engine fixtures under ``root``."""

    root: Path
    ckpt: Path
    support: Path
    query: Path

    @classmethod
    def make(cls, root: Path, per_class: int = 2) -> LabelEnv:
        from engine_fixtures import make_checkpoint, make_queries, make_support

        root.mkdir(parents=True, exist_ok=True)
        ckpt = make_checkpoint(root / "tiny.safetensors")
        make_support(root / "support")
        make_queries(root / "query", per_class)
        return cls(root, ckpt, root / "support", root / "query")

    def label_args(self, out: Path, *extra: str | os.PathLike[str],
                   cache: Path | None = None) -> list[str | os.PathLike[str]]:
        """``label`` arguments for this environment (cache in ``root`` unless given)."""
        return ["label", "--checkpoint", self.ckpt, "--support", self.support,
                "--query", self.query, "--out", out,
                "--cache", cache or self.root / "cache.sqlite", "--device", "cpu", *extra]


def tamper_checkpoint(src: Path, dst: Path, meta: dict | None = None,
                      tensors: dict | None = None) -> Path:
    """Copy the checkpoint ``src`` to ``dst`` with its metadata entries replaced by ``meta``
    (nested dicts merged one level deep: ``{"model": {"backbone_config": {...}}}`` replaces
    only that entry) and its tensors updated by ``tensors`` (a value of None removes one).
    The metadata is written as it is given: any structure, for bad-input cases."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(src), framework="pt") as f:
        doc = json.loads(f.metadata()["fewshot_studio"])
    for k, v in (meta or {}).items():
        if isinstance(v, dict) and isinstance(doc.get(k), dict):
            doc[k] = {**doc[k], **v}
        else:
            doc[k] = v
    state = load_file(str(src))
    for k, v in (tensors or {}).items():
        if v is None:
            state.pop(k, None)
        else:
            state[k] = v
    save_file(state, str(dst), metadata={"fewshot_studio": json.dumps(doc)})
    return dst


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (bytes). A step that allocates N bytes
    raises it by about N unless an earlier peak was higher: compare before and after."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def cache_disk_full(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every embedding cache opened from now on is full, as on a full disk: SQLite may not
    add a page to it (``PRAGMA max_page_count``; works as root, unlike chmod)."""
    import sqlite3

    from fewshot_studio.engine.cache import EmbeddingCache

    opened = EmbeddingCache._open

    def full(self: EmbeddingCache, *args: object, **kwargs: object) -> sqlite3.Connection:
        conn = opened(self, *args, **kwargs)
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {pages}").fetchone()
        return conn

    monkeypatch.setattr(EmbeddingCache, "_open", full)


def corrupt_sqlite_pages(path: Path, pages: range = range(2, 5)) -> None:
    """Overwrite whole pages (1-based numbers; page 1 holds the header and schema) of a
    SQLite file with garbage, as a bad sector would: a damaged cache."""
    data = bytearray(path.read_bytes())
    size = int.from_bytes(data[16:18], "big")
    size = 65536 if size == 1 else size
    assert len(data) // size >= pages.stop, f"{path} has too few pages"
    for page in pages:
        data[(page - 1) * size:page * size] = b"\xa5" * size
    path.write_bytes(bytes(data))


def deny_listing(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """Make listing ``folder`` fail as it does for a folder without read permission (chmod
    does not stop root, who runs the tests)."""
    import errno

    real = os.scandir

    def scandir(path: object = ".") -> object:
        if os.path.abspath(os.fspath(path)) == str(folder):  # type: ignore[arg-type]
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return real(path)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "scandir", scandir)
