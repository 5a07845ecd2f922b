"""CURVE keys for the tap's PUB socket, read from the node agent's key files.

The format is pyzmq's certificate files (`zmq.auth`), the same files
`pd-controller agent --keygen` writes: `NAME.key` (public) and `NAME.key_secret`
(public + secret). The tap is the CURVE *server*: it holds its own secret key and a
directory of the public keys of the controllers allowed to subscribe; a controller
holds its own secret key and the tap's public key, so it also knows it is talking to
the real tap (no one squatting on the port can feed it events).

Kept in router_plugin (which must not import the controller): only pyzmq.
"""

from __future__ import annotations

import ipaddress
import logging
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

log = logging.getLogger("pd-router-tap")

MAX_KEY_FILE_BYTES = 64 * 1024


class CurveKeyError(ValueError):
    """A key file or directory that cannot be used; the message names it."""


def _regular_file(path: Path, what: str) -> None:
    try:
        st = path.stat()
    except OSError as e:
        raise CurveKeyError(f"{what}={path}: cannot read ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):  # never open a FIFO or a device as a key file
        raise CurveKeyError(f"{what}={path}: not a regular file")
    if st.st_size > MAX_KEY_FILE_BYTES:
        raise CurveKeyError(f"{what}={path}: {st.st_size} bytes, not a key file")


def load_keypair(path: Path | str, what: str = "secret key") -> tuple[bytes, bytes]:
    """(public, secret) from a `.key_secret` file; CurveKeyError if it is not one."""
    path = Path(path)
    _regular_file(path, what)
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError, zmq.ZMQError) as e:
        raise CurveKeyError(f"{what}={path}: not a CURVE certificate ({e})") from None
    if not secret:
        raise CurveKeyError(f"{what}={path}: holds no secret key (give the .key_secret file)")
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("%s %s is readable by others (mode %o): chmod 600 it", what, path, stat.S_IMODE(mode))
    return public, secret


def load_public(path: Path | str, what: str = "public key") -> bytes:
    path = Path(path)
    _regular_file(path, what)
    try:
        public, _ = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError, zmq.ZMQError) as e:
        raise CurveKeyError(f"{what}={path}: not a CURVE certificate ({e})") from None
    return public


def authorized_public_keys(directory: Path | str) -> list[bytes]:
    """Every `*.key` in `directory` (at least one), validated one by one."""
    d = Path(directory)
    if not d.is_dir():
        raise CurveKeyError(f"authorized keys={d}: not a directory")
    keys = [load_public(p, "authorized key") for p in sorted(d.glob("*.key")) if p.is_file()]
    if not keys:
        raise CurveKeyError(f"authorized keys={d}: no *.key files, so no controller could subscribe")
    return keys


@dataclass(frozen=True, slots=True)
class ServerCurve:
    """The tap's CURVE identity and the controllers it lets in."""

    public: bytes
    secret: bytes
    authorized: tuple[bytes, ...]

    def start_authenticator(self, ctx: zmq.Context[Any]) -> ThreadAuthenticator:
        """A ZAP handler on `ctx` that admits only the authorised client keys."""
        auth = ThreadAuthenticator(ctx)
        auth.start()
        # configure_curve reads a directory; hand it the keys we validated instead
        auth.configure_curve_callback(domain="*", credentials_provider=_Allow(self.authorized))
        return auth


class _Allow:
    """zmq.auth credentials provider: a fixed set of client public keys (z85)."""

    def __init__(self, keys: tuple[bytes, ...]) -> None:
        self.keys = frozenset(keys)

    def callback(self, domain: str, key: bytes) -> bool:
        # the authenticator hands the client's key z85-encoded, as load_certificate reads them
        return key in self.keys


def load_server_curve(secret_key: Path | str, authorized_dir: Path | str) -> ServerCurve:
    public, secret = load_keypair(secret_key, "--curve-secret-key")
    return ServerCurve(public, secret, tuple(authorized_public_keys(authorized_dir)))


def is_loopback_endpoint(endpoint: str) -> bool:
    """tcp://127.x / [::1] / localhost, or a host-local transport (ipc://, inproc://)."""
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    if not endpoint.startswith("tcp://"):
        return False
    host = endpoint[len("tcp://"):].rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # '*', an interface or a host name: not provably loopback
        return False
