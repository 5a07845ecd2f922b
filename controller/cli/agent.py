"""`pd-controller agent --config FILE`: the node agent; `--keygen DIR [--name N]` writes a CURVE key pair."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from pathlib import Path

from controller.core.errors import PdControllerError


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "agent",
        help="node agent: restarts the local server in another role on an authenticated command",
        description="Run the node agent (ZeroMQ + CURVE command channel), or generate CURVE keys.",
        epilog="example: pd-controller agent --keygen /etc/pd-agent/keys --name agent && "
        "pd-controller agent --config configs/agent/agent.yaml",
    )
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--config", type=Path, help="agent config YAML (see configs/agent/agent.yaml)")
    g.add_argument("--keygen", type=Path, metavar="DIR",
                   help="write NAME.key and NAME.key_secret (mode 0600) into DIR; never overwrites")
    p.add_argument("--name", default="agent", help="key pair name for --keygen: a file name, not a path (default: agent)")


def run(args: argparse.Namespace) -> int:
    if args.keygen is not None:
        from controller.agent.keys import generate

        pub, sec = generate(args.keygen, args.name)
        print(f"public key: {pub}\nsecret key: {sec} (keep private)")
        return 0
    import zmq

    from controller.agent.config import load_agent_config
    from controller.agent.server import NodeAgent

    cfg = load_agent_config(args.config)

    async def main() -> None:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        assert task is not None
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(RuntimeError, ValueError):  # not the main thread (tests): no handlers
                loop.add_signal_handler(sig, task.cancel)
        agent = NodeAgent(cfg)
        try:
            try:
                await agent.start()
            except (OSError, ValueError, RuntimeError, zmq.ZMQError) as e:
                # a key file that does not load, an endpoint in use, a state directory not ours
                raise PdControllerError(f"{args.config}: cannot start the agent: {type(e).__name__}: {e}") from None
            from controller.agent.server import log

            log.info("agent_ready", endpoint=agent.bound_endpoint, worker=cfg.worker_url, role=agent.role,
                     state=agent.state)
            with contextlib.suppress(asyncio.CancelledError):
                await agent.serve()
        finally:
            await agent.close()

    asyncio.run(main())
    return 0
