"""`pd-controller demo`: the whole system on one machine (router, emulated workers, agents, tap, controller).

The implementation is harness code (process launching, the replayed load, the report) and lives in
`harness/demo.py`, outside the product packages; this module only registers the subcommand.
"""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    from harness.demo import add_parser as add

    add(sub)


def run(args: argparse.Namespace) -> int:
    from harness.demo import run as run_demo

    return run_demo(args)
