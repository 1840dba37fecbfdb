"""Packaging: bundled data found as package data, the wheel carries it, the frozen app runs.

The checkpoints and resources live at the top of the repository and install as the data
packages ``fewshot_studio.checkpoints`` / ``fewshot_studio.resources`` (pyproject.toml,
setup.py); ``fewshot_studio.paths`` finds them with importlib.resources, never relative to the
working directory.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from fewshot_studio import __version__, paths

REPO = Path(__file__).resolve().parent.parent
# What a wheel is built from (a copy of these, so the build never writes into the checkout).
SOURCE_ITEMS = ("fewshot_studio", "resources", "checkpoints", "pyproject.toml", "setup.py",
                "README.md", "LICENSE")
DATA_FOLDERS = {"resources": "fewshot_studio/resources",
                "checkpoints": "fewshot_studio/checkpoints"}
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")


def _files(root: Path) -> list[str]:
    """Every file under root, as posix paths relative to it (no bytecode)."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc")


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen", OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def test_paths_resolve_to_bundled_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # nothing may depend on the working directory
    res, ckpt = paths.resources_dir(), paths.checkpoints_dir()
    assert res.is_absolute() and ckpt.is_absolute()
    assert (res / "demo" / "demo.fsproj").is_file()
    assert (res / "demo" / "ATTRIBUTION.md").is_file()
    assert (res / "icons" / "fewshot-studio.svg").is_file()
    assert any((res / "icons").glob("fewshot-studio-*.png"))
    bundled = paths.bundled_checkpoints()
    assert bundled, f"no checkpoints in {ckpt}"
    for name, file in bundled.items():
        assert file.is_file() and file.parent == ckpt
        assert paths.resolve_checkpoint(name) == file
    # The demo project's checkpoint is one that ships.
    assert '"checkpoint"' in (res / "demo" / "demo.fsproj").read_text(encoding="utf-8")


def test_desktop_entry_and_icons() -> None:
    entry = (REPO / "packaging" / "fewshot-studio.desktop").read_text(encoding="utf-8")
    lines = entry.splitlines()
    assert lines[0] == "[Desktop Entry]"
    keys = dict(line.split("=", 1) for line in lines[1:] if "=" in line)
    assert keys["Type"] == "Application" and keys["Exec"].split()[0] == "fewshot-studio"
    assert (paths.resources_dir() / "icons" / f"{keys['Icon']}.svg").is_file()
    if validate := shutil.which("desktop-file-validate"):  # Debian's desktop-file-utils
        proc = subprocess.run([validate, str(REPO / "packaging" / "fewshot-studio.desktop")],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and "error" not in proc.stdout, proc.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from a copy of the checkout (setuptools of this environment, no deps)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for item in SOURCE_ITEMS:
        p = REPO / item
        if p.is_dir():
            shutil.copytree(p, src / item, ignore=IGNORED)
        elif p.is_file():
            shutil.copy2(p, src / item)
    out = tmp / "dist"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "--disable-pip-version-check", "-w", str(out), str(src)],
        capture_output=True, text=True, timeout=300, cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (whl,) = out.glob("fewshot_studio-*.whl")
    return whl


def test_wheel_contains_code_resources_and_checkpoints(wheel: Path) -> None:
    assert wheel.name.startswith(f"fewshot_studio-{__version__}-")
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder, target in DATA_FOLDERS.items():
        expected = {f"{target}/{f}" for f in _files(REPO / folder)}
        assert expected, folder
        assert not expected - names, f"missing from the wheel: {sorted(expected - names)[:5]}"
    assert "fewshot_studio/resources/demo/demo.fsproj" in names
    assert any(n.startswith("fewshot_studio/checkpoints/") and n.endswith(".safetensors")
               for n in names)
    code = {f"fewshot_studio/{f}" for f in _files(REPO / "fewshot_studio") if f.endswith(".py")}
    assert not code - names, f"code missing from the wheel: {sorted(code - names)[:5]}"
    dist_info = f"fewshot_studio-{__version__}.dist-info"
    entry_points = zipfile.ZipFile(wheel).read(f"{dist_info}/entry_points.txt").decode()
    assert "fewshot-studio = fewshot_studio.cli:main" in entry_points
    if (REPO / "LICENSE").is_file():
        assert any(n.startswith(dist_info) and n.endswith("LICENSE") for n in names)


def test_installed_layout_finds_data_outside_the_repo(wheel: Path, tmp_path: Path) -> None:
    """The wheel's files, imported from elsewhere, find their own bundled data."""
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    code = ("from fewshot_studio import paths; "
            "print(paths.resources_dir()); print(paths.checkpoints_dir()); "
            "print(*paths.bundled_checkpoints())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=cwd, env=_env(PYTHONPATH=str(site)), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res, ckpt, names = proc.stdout.splitlines()
    assert Path(res) == site / "fewshot_studio" / "resources"
    assert Path(ckpt) == site / "fewshot_studio" / "checkpoints"
    assert names.split() == list(paths.bundled_checkpoints())
    proc = subprocess.run([sys.executable, "-m", "fewshot_studio", "--version"],
                          capture_output=True, text=True, cwd=cwd,
                          env=_env(PYTHONPATH=str(site)), timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == f"fewshot-studio {__version__}"


@pytest.mark.slow
def test_frozen_app_runs_headless(tmp_path: Path) -> None:
    """Build the one-folder app (PyInstaller), then run its --version and --demo --screenshot.

    Slow (minutes: the analysis of torch); `make package` builds the same bundle. Set
    FEWSHOT_BUNDLE to an already built dist/fewshot-studio folder to test that one instead.
    """
    if os.environ.get("FEWSHOT_BUNDLE"):
        bundle = Path(os.environ["FEWSHOT_BUNDLE"]).resolve()
    else:
        pytest.importorskip("PyInstaller")
        proc = subprocess.run(
            [sys.executable, "-m", "PyInstaller", "--noconfirm", "--log-level", "WARN",
             "--distpath", str(tmp_path / "dist"), "--workpath", str(tmp_path / "build"),
             str(REPO / "packaging" / "fewshot_studio.spec")],
            capture_output=True, text=True, timeout=1800, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        bundle = tmp_path / "dist" / "fewshot-studio"
    exe = bundle / "fewshot-studio"
    assert exe.is_file()
    # Installed system-wide, every user must be able to read the bundled data (the working
    # tree may hold checkpoints written 0600).
    private = [p for p in (bundle / "_internal" / "fewshot_studio").rglob("*")
               if p.is_file() and not p.stat().st_mode & 0o004]
    assert not private, f"not readable by other users: {private[:3]}"
    home = tmp_path / "home"
    env = _env(XDG_CACHE_HOME=str(home / "cache"), XDG_DATA_HOME=str(home / "data"),
               XDG_CONFIG_HOME=str(home / "config"), XDG_STATE_HOME=str(home / "state"))
    proc = subprocess.run([str(exe), "--version"], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == f"fewshot-studio {__version__}"
    proc = subprocess.run([str(exe), "checkpoints"], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 0
    assert all(name in proc.stdout for name in paths.bundled_checkpoints())
    shot = tmp_path / "demo.png"
    proc = subprocess.run([str(exe), "--demo", "--screenshot", str(shot)], capture_output=True,
                          text=True, cwd=tmp_path, env=env, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    from PIL import Image

    with Image.open(shot) as im:
        assert im.width > 400 and im.height > 300


def test_wheel_declares_the_cluster_extra(wheel: Path) -> None:
    """Ray is optional: ``pip install "fewshot-studio[cluster]"`` adds Ray Data and pyarrow;
    a plain install requires neither."""
    dist_info = f"fewshot_studio-{__version__}.dist-info"
    meta = zipfile.ZipFile(wheel).read(f"{dist_info}/METADATA").decode()
    assert "Provides-Extra: cluster" in meta.splitlines()
    requires = [line.split(":", 1)[1].strip() for line in meta.splitlines()
                if line.startswith("Requires-Dist:")]
    cluster = [r for r in requires if r.endswith("extra == \"cluster\"")]
    assert any(r.startswith("ray[data]") for r in cluster)
    assert any(r.startswith("pyarrow") for r in cluster)
    assert not any(r.startswith(("ray", "pyarrow")) for r in requires if "extra ==" not in r)


def _pins(lock: Path) -> dict[str, str]:
    """``{name: version}`` of a requirements lock (uv's output, with or without hashes)."""
    import re

    return dict(re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\]+)",
                           lock.read_text(encoding="utf-8"), re.M))


@pytest.mark.parametrize("flavour", ["cpu", "cuda"])
def test_cluster_locks_extend_the_flavour_locks(flavour: str) -> None:
    """``requirements/<flavour>-cluster.lock`` (`make lock`): every pin of the flavour's lock
    unchanged, plus Ray's; the CUDA lock's torchvision is the release built for its torch
    (torch 2.N pairs with torchvision 0.(N+15))."""
    base = _pins(REPO / "requirements" / f"{flavour}.lock")
    cluster = _pins(REPO / "requirements" / f"{flavour}-cluster.lock")
    assert {k: cluster.get(k) for k in base} == base
    assert {"ray", "pyarrow"} <= set(cluster) - set(base)
    if flavour == "cuda":
        torch_minor = int(base["torch"].split(".")[1])
        assert base["torchvision"].startswith(f"0.{torch_minor + 15}.")
