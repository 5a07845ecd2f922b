"""Wire format of the node agent's command channel (JSON over a CURVE-authenticated ZeroMQ socket).

Request:  {"v": 1, "id": str, "cmd": "status" | "switch" | "stop" | "start", "role"?: "prefill" | "decode"}
Reply:    {"v": 1, "id": str, "ok": bool, "error": str | null, "role": str | null,
           "state": "running" | "stopped" | "switching" | "failed", "healthy": bool, "progress": str, "url": str,
           "pid": int | null}

A command names an operation and a role, never a program: the agent runs only
the argv templates of its own config. Anything else is refused with a reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from controller.boundedjson import JsonInputError, loads_bounded

VERSION = 1
COMMANDS = ("status", "switch", "stop", "start")
ROLES = ("prefill", "decode")
MAX_MESSAGE_BYTES = 4096
MAX_DEPTH = 2


class MalformedCommand(ValueError):
    """A command that does not parse or does not validate; `reason` is a short metric label."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        super().__init__(detail)


@dataclass(frozen=True)
class Command:
    id: str
    cmd: str
    role: str | None = None

    def encode(self) -> bytes:
        d: dict[str, Any] = {"v": VERSION, "id": self.id, "cmd": self.cmd}
        if self.role is not None:
            d["role"] = self.role
        return json.dumps(d).encode()


def decode_command(raw: bytes) -> Command:
    if len(raw) > MAX_MESSAGE_BYTES:
        raise MalformedCommand("too_large", f"message of {len(raw)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        # a command is one flat object: nothing may nest deeper (4 KB of `[` once raised RecursionError)
        d = loads_bounded(raw, max_bytes=MAX_MESSAGE_BYTES, max_depth=MAX_DEPTH)
    except JsonInputError as e:
        reason = "not_json" if e.reason in ("not_json", "not_utf8", "not_finite", "number_too_long") else e.reason
        raise MalformedCommand(reason, f"not a command: {e}") from None
    if not isinstance(d, dict):
        raise MalformedCommand("not_object", f"expected an object, got {type(d).__name__}")
    extra = set(d) - {"v", "id", "cmd", "role"}
    if extra:
        raise MalformedCommand("unknown_field", f"unknown fields {sorted(extra)!r}")
    if d.get("v") != VERSION:
        raise MalformedCommand("bad_version", f"v={d.get('v')!r}: expected {VERSION}")
    cid = d.get("id")
    if not isinstance(cid, str) or not 0 < len(cid) <= 64:
        raise MalformedCommand("bad_id", f"id={cid!r}: expected a string of 1..64 chars")
    cmd = d.get("cmd")
    if cmd not in COMMANDS:
        raise MalformedCommand("bad_cmd", f"cmd={cmd!r}: expected one of {COMMANDS}")
    role = d.get("role")
    if cmd in ("switch", "start"):
        if role not in ROLES:
            raise MalformedCommand("bad_role", f"role={role!r}: expected one of {ROLES}")
    elif role is not None:
        raise MalformedCommand("bad_role", f"role={role!r} not allowed with cmd={cmd!r}")
    return Command(id=cid, cmd=cmd, role=role)


@dataclass(frozen=True)
class Reply:
    id: str
    ok: bool
    state: str
    role: str | None
    healthy: bool
    url: str = ""
    progress: str = ""
    error: str | None = None
    pid: int | None = None  # the managed server's process id, for operators

    def encode(self) -> bytes:
        return json.dumps(
            {
                "v": VERSION, "id": self.id, "ok": self.ok, "error": self.error, "role": self.role,
                "state": self.state, "healthy": self.healthy, "progress": self.progress, "url": self.url,
                "pid": self.pid,
            }
        ).encode()


def decode_reply(raw: bytes) -> Reply:
    d = loads_bounded(raw, max_bytes=16 * MAX_MESSAGE_BYTES, max_depth=MAX_DEPTH)  # ValueError when malformed
    if not isinstance(d, dict):
        raise ValueError("reply is not an object")
    return Reply(
        id=str(d.get("id", "")), ok=bool(d.get("ok")), state=str(d.get("state", "")),
        role=d.get("role") if d.get("role") in ROLES else None, healthy=bool(d.get("healthy")),
        url=str(d.get("url", "")), progress=str(d.get("progress", "")), error=d.get("error"),
        pid=d.get("pid") if isinstance(d.get("pid"), int) else None,
    )
