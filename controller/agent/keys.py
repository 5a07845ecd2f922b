"""CURVE key pairs for the agent channel, as zmq.auth certificate files (`NAME.key`, `NAME.key_secret`)."""

from __future__ import annotations

from pathlib import Path

import zmq.auth


def generate(directory: Path, name: str) -> tuple[Path, Path]:
    """Write NAME.key (public, share it) and NAME.key_secret (keep it, mode 0600) into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(str(directory), name)
    Path(secret).chmod(0o600)
    return Path(public), Path(secret)
