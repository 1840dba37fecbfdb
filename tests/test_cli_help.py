"""``fewshot-studio --help``: fast (no heavy import), every option explained, an example per
command."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from fewshot_studio import cli

HEAVY = ("torch", "onnx", "onnxruntime", "PySide6", "PIL", "numpy", "safetensors")
# The parsers this test holds to "every option has help, an example in the epilog"; train and
# eval are meant to follow.
OWNED = ("label", "checkpoints", "export-onnx", "calibrate", "duplicates", "eval", "train")


def _imported_modules(code: str) -> set[str]:
    """Top-level names of the modules a fresh interpreter imports while running ``code``
    (``python -X importtime`` lists every import on stderr)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", code],
                          capture_output=True, text=True, timeout=120, check=True)
    names = set()
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            names.add(name.split(".")[0])
    return names


def test_help_imports_nothing_heavy() -> None:
    """Importing the CLI, building the parser with every subcommand and printing the help of
    ``label`` imports neither torch nor ONNX, ONNX Runtime, PySide6, PIL or numpy."""
    code = ("import contextlib, io, fewshot_studio.cli as c\n"
            "p = c.build_parser()\n"
            "for argv in ([], ['label'], ['checkpoints'], ['export-onnx'], ['calibrate'],"
            "             ['duplicates']):\n"
            "    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
            "        c.main([*argv, '--help'])\n")
    imported = _imported_modules(code)
    assert "fewshot_studio" in imported and "argparse" in imported  # the listing works
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return {name: sub for a in parser._actions if isinstance(a, argparse._SubParsersAction)
            for name, sub in a.choices.items()}


def _missing_help(parser: argparse.ArgumentParser) -> list[str]:
    return [a.option_strings[0] if a.option_strings else a.dest for a in parser._actions
            if not (a.help or "").strip() and a.help != argparse.SUPPRESS]


def test_every_option_has_help_and_every_command_an_example() -> None:
    parser = cli.build_parser()
    subs = _subparsers(parser)
    assert set(OWNED) <= set(subs)
    for name, p in [("fewshot-studio", parser), *((n, subs[n]) for n in OWNED)]:
        assert not _missing_help(p), f"{name}: options without help: {_missing_help(p)}"
        assert "example" in (p.epilog or ""), f"{name}: no example"
        assert f"fewshot-studio {'' if p is parser else name}".strip() in p.epilog
        assert p.description, f"{name}: no description"
    sub_action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert all(a.help for a in sub_action._choices_actions), "a command without help"


@pytest.mark.parametrize("argv", [["--help"], ["label", "--help"], ["checkpoints", "--help"],
                                  ["export-onnx", "--help"], ["calibrate", "--help"],
                                  ["duplicates", "--help"]])
def test_help_shows_the_example(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """The epilog's command lines print as written (not re-wrapped) and lines stay short."""
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "\nexample" in out and "\n  fewshot-studio" in out
    assert max(len(line) for line in out.splitlines()) <= 100


def test_export_tolerance_matches_the_engine() -> None:
    """``export-onnx --tolerance`` defaults to the engine's parity tolerance, repeated in the
    CLI so that ``--help`` does not import torch."""
    from fewshot_studio.cli.export_onnx import DEFAULT_TOLERANCE
    from fewshot_studio.engine.onnx_export import PARITY_TOLERANCE

    assert DEFAULT_TOLERANCE == PARITY_TOLERANCE


def test_duplicates_threshold_matches_the_engine() -> None:
    """``duplicates --threshold`` defaults to the engine's, repeated in the CLI so that
    ``--help`` does not import numpy."""
    from fewshot_studio.cli.duplicates import DEFAULT_THRESHOLD
    from fewshot_studio.engine.duplicates import DEFAULT_THRESHOLD as ENGINE_THRESHOLD

    assert DEFAULT_THRESHOLD == ENGINE_THRESHOLD


def test_a_listed_subcommand_module_that_is_missing_is_an_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    cli.build_parser()  # every listed module is there
    monkeypatch.setattr(cli, "SUBCOMMAND_MODULES", (*cli.SUBCOMMAND_MODULES, "not_built_yet"))
    with pytest.raises(ModuleNotFoundError, match="not_built_yet"):
        cli.build_parser()
