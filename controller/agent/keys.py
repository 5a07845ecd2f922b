"""CURVE key pairs for the agent channel, as zmq.auth certificate files (`NAME.key`, `NAME.key_secret`).

The secret key file is created with mode 0600 by the `open` call itself
(O_CREAT | O_EXCL, mode 0o600: never visible wider, not even between a write and
a chmod), written under a temporary name and linked into place, so a reader
sees either no file or the whole key. Existing keys are never overwritten.
A NAME is a file name, not a path: it cannot leave the key directory.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
from pathlib import Path

import zmq

from controller.core.errors import PdControllerError

KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class KeyFileError(PdControllerError):
    """A key name or key directory that cannot be used; the message says which and why."""


def check_name(name: str) -> str:
    if not KEY_NAME.fullmatch(name) or ".." in name:
        raise KeyFileError(f"--name={name!r}: a key name is 1-64 letters, digits, '.', '_' or '-', not starting with "
                        "'.' and without '..' or path separators (it names files inside the key directory)")
    return name


def _body(public: str, secret: str | None) -> str:
    kind = "secret" if secret else "public"
    lines = [f"#   ****  Generated on {datetime.datetime.now():%Y-%m-%d %H:%M:%S} by pd-controller  ****",
             f"#   ZeroMQ CURVE **{kind}** certificate", "metadata", "curve", f'    public-key = "{public}"']
    if secret:
        lines.append(f'    secret-key = "{secret}"')
    return "\n".join(lines) + "\n"


def _write_new(path: Path, text: str, mode: int) -> None:
    """Write `text` to a new file `path` with `mode` from the first byte on; fail if `path` exists."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    try:
        os.fchmod(fd, mode)  # exactly this mode, whatever the umask
        with os.fdopen(fd, "w") as f:
            fd = -1
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)  # atomic, and fails if `path` appeared meanwhile: nothing is overwritten
    except FileExistsError:
        raise KeyFileError(f"{path}: exists; refusing to overwrite a key (remove it first)") from None
    finally:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def generate(directory: Path, name: str) -> tuple[Path, Path]:
    """Write NAME.key (public, share it) and NAME.key_secret (keep it, mode 0600) into `directory`."""
    check_name(name)
    directory = Path(directory)
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise KeyFileError(f"{directory}: cannot create the key directory: {e.strerror}") from None
    if not directory.is_dir():
        raise KeyFileError(f"{directory}: not a directory")
    public_file, secret_file = directory / f"{name}.key", directory / f"{name}.key_secret"
    for f in (public_file, secret_file):
        if os.path.lexists(f):
            raise KeyFileError(f"{f}: exists; refusing to overwrite a key (remove it first)")
    public, secret = (k.decode("ascii") for k in zmq.curve_keypair())
    try:
        _write_new(secret_file, _body(public, secret), 0o600)
        _write_new(public_file, _body(public, None), 0o644)
    except OSError as e:
        raise KeyFileError(f"{directory}: cannot write keys: {e.strerror}") from None
    return public_file, secret_file
