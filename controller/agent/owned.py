"""The server a node agent owns: its process group, its state file, and who holds its port.

A process is identified by (pid, start time): the start time (field 22 of
/proc/PID/stat, in clock ticks since boot) tells a live server from an
unrelated process that reused its pid. The state file records that pair,
the process group (the server is started in its own session, so its group id
is its pid) and the role, written atomically with mode 0600.

Port ownership is read from /proc/net/tcp{,6}: the inode of the socket
LISTENing on the port, then which process holds a descriptor to that inode.
Where /proc is not available (not Linux) these checks fall back to
"the process is alive" and "something accepts a TCP connection".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import tempfile
from pathlib import Path
from typing import Any

PROC = Path("/proc")


def start_time(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot, or None when there is no such process."""
    try:
        raw = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # comm (field 2) may contain spaces and parentheses: the fields after it start at the last ')'
    rest = raw[raw.rfind(")") + 2:].split()
    try:
        if rest[0] == "Z":  # a zombie has exited
            return None
        return int(rest[19])  # field 22 overall
    except (IndexError, ValueError):
        return None


def _pgrp(pid: int) -> int | None:
    try:
        raw = (PROC / str(pid) / "stat").read_text()
        return int(raw[raw.rfind(")") + 2:].split()[2])  # field 5
    except (OSError, IndexError, ValueError):
        return None


def listening_inodes(port: int) -> set[str]:
    """Inodes of the TCP sockets in LISTEN state on `port` (any address, IPv4 and IPv6)."""
    out: set[str] = set()
    for name in ("tcp", "tcp6"):
        try:
            lines = (PROC / "net" / name).read_text().splitlines()[1:]
        except OSError:
            continue
        for ln in lines:
            f = ln.split()
            if len(f) > 9 and f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:
                out.add(f[9])
    return out


def _holds(pid: int, inodes: set[str]) -> bool:
    want = {f"socket:[{i}]" for i in inodes}
    try:
        fds = os.listdir(PROC / str(pid) / "fd")
    except OSError:
        return False
    for fd in fds:
        with contextlib.suppress(OSError):
            if os.readlink(PROC / str(pid) / "fd" / fd) in want:
                return True
    return False


def _pids() -> list[int]:
    try:
        return [int(n) for n in os.listdir(PROC) if n.isdigit()]
    except OSError:
        return []


def port_holder(host: str, port: int) -> str | None:
    """Who listens on the port ("pid 123 (python3)", "an unknown process"), or None when it is free."""
    inodes = listening_inodes(port) if PROC.is_dir() else set()
    if inodes:
        for pid in _pids():
            if _holds(pid, inodes):
                try:
                    comm = (PROC / str(pid) / "comm").read_text().strip()
                except OSError:
                    comm = "?"
                return f"pid {pid} ({comm})"
        return "a process of another user or namespace"
    if PROC.is_dir() and (PROC / "net" / "tcp").exists():
        return None
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return "an unknown process"
    return None


class Server:
    """A server process of ours: spawned here (our child) or adopted from a state file (a former agent's)."""

    def __init__(self, pid: int, started: int | None, proc: asyncio.subprocess.Process | None) -> None:
        self.pid = pid
        self.pgid = pid  # start_new_session: the server leads its own group
        self.started = started
        self._proc = proc

    @classmethod
    async def spawn(cls, argv: list[str]) -> Server:
        proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL, start_new_session=True)
        return cls(proc.pid, start_time(proc.pid), proc)

    @classmethod
    def adopt(cls, rec: dict[str, Any]) -> Server | None:
        """The recorded process if it is still that very process (same pid and start time), else None."""
        pid, started = rec.get("pid"), rec.get("start_time")
        if not isinstance(pid, int) or pid <= 1 or not isinstance(started, int):
            return None
        if start_time(pid) != started:
            return None
        return cls(pid, started, None)

    def alive(self) -> bool:
        if self._proc is not None:
            return self._proc.returncode is None
        return self.started is not None and start_time(self.pid) == self.started

    def describe_exit(self) -> str:
        if self._proc is not None and self._proc.returncode is not None:
            return f"exit code {self._proc.returncode}"
        return "exited"

    def holds_port(self, port: int) -> bool:
        """A process of our server's group listens on `port` (Linux); elsewhere: our server is alive."""
        if not PROC.is_dir():
            return self.alive()
        inodes = listening_inodes(port)
        if not inodes:
            return False
        if _holds(self.pid, inodes):
            return True
        # the listener may be a child of the server (a launcher that forks the HTTP process)
        return any(_pgrp(p) == self.pgid and _holds(p, inodes) for p in _pids())

    def record(self, *, role: str, port: int, argv: list[str]) -> dict[str, Any]:
        return {"pid": self.pid, "pgid": self.pgid, "start_time": self.started, "role": role, "port": port,
                "argv": argv}

    async def stop(self, timeout_s: float) -> None:
        """SIGTERM the group, SIGKILL it after `timeout_s`; wait until the server is gone."""
        if not self.alive():
            if self._proc is not None:
                await self._proc.wait()
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pgid, signal.SIGTERM)
        if not await self._wait(timeout_s):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pgid, signal.SIGKILL)
            await self._wait(timeout_s)

    async def _wait(self, timeout_s: float) -> bool:
        if self._proc is not None:
            try:
                await asyncio.wait_for(self._proc.wait(), timeout_s)
                return True
            except TimeoutError:
                return False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while loop.time() < deadline:  # not our child: poll
            if not self.alive():
                return True
            await asyncio.sleep(0.05)
        return not self.alive()


# ---- the state file ------------------------------------------------------------------------------

def default_state_dir() -> Path:
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return Path(base) / f"pd-agent-{os.getuid()}"


def ensure_private_dir(d: Path) -> None:
    """Create `d` 0700, or check that it is ours and private (a shared /tmp must not let others plant a file)."""
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = d.lstat()
    import stat as st_

    if not st_.S_ISDIR(st.st_mode):
        raise RuntimeError(f"state directory {d}: not a directory")
    if st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise RuntimeError(f"state directory {d}: must be owned by uid {os.getuid()} and not group/other-writable")


def read_state(path: Path) -> dict[str, Any] | None:
    try:
        raw = path.read_bytes()[:65536]
        d = json.loads(raw)
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None


def write_state(path: Path, rec: dict[str, Any]) -> None:
    ensure_private_dir(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(rec, f)
    os.replace(tmp, path)


def clear_state(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
