"""`pd-controller` entry point: a dispatcher over subcommand modules.

Each module in SUBCOMMANDS exposes `add_parser(subparsers)` and `run(args) -> int`.
Expected errors (bad flag, bad config, bad profile, infeasible objectives) print one
line and exit 2; no traceback reaches the user. Anything else is a bug: one line
naming the exception, exit 1 (PDCTL_DEBUG=1 shows the traceback).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import typing
from collections.abc import Sequence
from types import ModuleType

from controller import __version__
from controller.core.errors import PdControllerError

# order is the order of `--help`
SUBCOMMANDS = (
    "demo",
    "plan",
    "simulate",
    "bench",
    "run",
    "profile",
    "emulate_worker",
    "agent",
)


def _load(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(f"controller.cli.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"controller.cli.{name}":
            return None  # capability not part of this build
        raise


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (the usage is one `--help` away), exit 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message.splitlines()[0][:500]} (see {self.prog} --help)\n")


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, ModuleType]]:
    parser = OneLineParser(
        prog="pd-controller",
        description="Keep the prefill/decode split of a disaggregated SGLang fleet right.",
    )
    parser.add_argument("--version", action="version", version=f"pd-controller {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    mods: dict[str, ModuleType] = {}
    for name in SUBCOMMANDS:
        mod = _load(name)
        if mod is not None:
            mod.add_parser(sub)
            mods[name.replace("_", "-")] = mod
    return parser, mods


def main(argv: Sequence[str] | None = None) -> int:
    parser, mods = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    mod = mods[args.command]
    try:
        return int(mod.run(args) or 0)
    except PdControllerError as e:
        print(f"pd-controller {args.command}: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        if os.environ.get("PDCTL_DEBUG"):
            raise
        print(f"pd-controller {args.command}: internal error: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
              " (PDCTL_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1
