"""`pd-controller agent --config FILE`: the node agent; `--keygen DIR [--name N]` writes a CURVE key pair."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "agent",
        help="node agent: restarts the local server in another role on an authenticated command",
        description="Run the node agent (ZeroMQ + CURVE command channel), or generate CURVE keys.",
    )
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--config", type=Path, help="agent config YAML (see configs/agent/agent.yaml)")
    g.add_argument("--keygen", type=Path, metavar="DIR", help="write NAME.key and NAME.key_secret into DIR")
    p.add_argument("--name", default="agent", help="key pair name for --keygen (default: agent)")


def run(args: argparse.Namespace) -> int:
    if args.keygen is not None:
        from controller.agent.keys import generate

        pub, sec = generate(args.keygen, args.name)
        print(f"public key: {pub}\nsecret key: {sec} (keep private)")
        return 0
    from controller.agent.config import load_agent_config
    from controller.agent.server import run_agent

    cfg = load_agent_config(args.config)

    async def main() -> None:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        assert task is not None
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await run_agent(cfg)

    asyncio.run(main())
    return 0
