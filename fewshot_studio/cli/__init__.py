"""``fewshot-studio`` command line. Without a subcommand it opens the desktop app
(``fewshot-studio PROJECT.fsproj`` opens that project, like ``--open PROJECT``).

Each subcommand lives in its own module here with a ``register(subparsers)`` function that adds
its parser and sets ``func`` (``args -> exit code``).

``--help`` must stay fast: importing this package and every subcommand module, and building the
parser, imports neither torch, ONNX, ONNX Runtime, PIL nor PySide6 (``tests/test_cli_help.py``);
each ``run`` imports the engine it needs."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import textwrap
from collections.abc import Sequence
from typing import Any

from fewshot_studio import __version__
from fewshot_studio.errors import UserError

# Modules under fewshot_studio.cli, each registering one or more subcommands.
SUBCOMMAND_MODULES = ("train", "evaluate", "label", "checkpoints", "export_onnx", "calibrate",
                      "duplicates", "import_backbone")


def help_texts(description: str, *examples: str) -> dict[str, Any]:
    """Keyword arguments for ``add_parser`` / ``ArgumentParser``: the ``description`` wrapped
    to 79 columns and an epilog of example command lines (each kept as written), shown by
    ``--help`` with :class:`argparse.RawDescriptionHelpFormatter`."""
    epilog = "example" + ("s" if len(examples) > 1 else "") + ":\n" + "\n".join(
        textwrap.indent(e, "  ") for e in examples)
    return {"description": textwrap.fill(description, 79), "epilog": epilog,
            "formatter_class": argparse.RawDescriptionHelpFormatter}


def build_parser() -> argparse.ArgumentParser:
    """The ``fewshot-studio`` parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="fewshot-studio",
        **help_texts(
            "Label folders of images from a few examples per class. Without a COMMAND it "
            "opens the app; `fewshot-studio PROJECT.fsproj` opens a project. "
            "`fewshot-studio COMMAND --help` describes a command.",
            "fewshot-studio                     # the app",
            "fewshot-studio batch.fsproj        # open a project",
            "fewshot-studio checkpoints         # which model for photos, which for characters",
            "fewshot-studio label --checkpoint natural-protonet --support examples/ \\\n"
            "    --query photos/ --out labels.csv"),
    )
    parser.add_argument("--version", action="version", version=f"fewshot-studio {__version__}")
    parser.add_argument("--demo", action="store_true", help="open the bundled demo project")
    parser.add_argument("--screenshot", metavar="PNG",
                        help="with --demo: label the demo, save a window screenshot, exit")
    parser.add_argument("--open", dest="project", metavar="PROJECT",
                        help="a project file to open (or give it as the only argument)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND",
                                help="a command to run instead of opening the app")
    for name in SUBCOMMAND_MODULES:  # a listed module that is missing is an error
        importlib.import_module(f"fewshot_studio.cli.{name}").register(sub)
    return parser


def _open_app(args: argparse.Namespace) -> int:
    try:
        from fewshot_studio.gui.app import run_app
    except ModuleNotFoundError as e:
        if not e.name or not e.name.startswith("fewshot_studio.gui"):
            raise
        from fewshot_studio.cli.demo import run_headless_demo

        return run_headless_demo()
    return run_app(args)


_VALUED = frozenset({"--screenshot", "--open"})  # top-level options that take a value


def _project_argument(argv: list[str], commands: Sequence[str]) -> list[str]:
    """``fewshot-studio P.fsproj`` -> ``fewshot-studio --open P.fsproj``: the first positional
    argument, when it is not a subcommand and names a project file (``.fsproj`` or an existing
    file), is the project to open. Anything else is left for argparse to judge."""
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        i += 2 if argv[i] in _VALUED else 1
    if i >= len(argv) or argv[i] in commands:
        return argv
    from fewshot_studio.gui.project_io import PROJECT_SUFFIX  # only here: keeps --help fast

    if argv[i].endswith(PROJECT_SUFFIX) or os.path.isfile(argv[i]):
        return [*argv[:i], "--open", argv[i], *argv[i + 1:]]
    return argv


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The parsed command line (a project file may be the only positional argument)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    commands = [name for a in parser._actions if isinstance(a, argparse._SubParsersAction)
                for name in a.choices]
    return parser.parse_args(_project_argument(argv, commands))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (2 and a one-line ``error:`` for a
    :class:`UserError`, 130 when interrupted)."""
    args = parse_args(argv)
    try:
        if args.command is None:
            return _open_app(args)
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
