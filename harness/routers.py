"""Which PD router the project launches, and its command line: one setting, one place.

    router = "smg"             # Shepherd Model Gateway 1.x (PyPI `smg`): the default, what SGLang PD runs today
    router = "sglang-router"   # its predecessor, sglang-router 0.3.x (PyPI `sglang-router`)
    router = "my-router --pd-disaggregation {args}"   # any other command: {args} is replaced by the PD flags

The setting is the `router` argument of `EmulatedFleet`, `AgentFleet` and
`pd-controller demo --router`, and the `PD_ROUTER` environment variable where
none is given (CI runs the 0.3.2 subset with `PD_ROUTER=sglang-router`).

Both routers are started as `python -m <module>`, never through a console
script: the two PyPI packages both install an `smg` script, and whichever was
installed last wins (sglang-router 0.3.2's `smg` is the old router's CLI).

Both take the same PD flags (`--pd-disaggregation --prefill URL PORT --decode
URL --host --port --prometheus-host --prometheus-port --policy ...`); smg also
gets `--model-alias NAME=SERVED` for each alias (smg routes by model name: an
unknown name is a 503, chat without a model a 400) and a 1 s load-monitor
interval (it polls the workers' `/loads` for their running window, which its
decode admission gate uses; the emulated fleets run faster than real time).
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from controller.core.errors import PdControllerError

DEFAULT_ROUTER = "smg"
ENV = "PD_ROUTER"
KNOWN = {
    "smg": ("smg", ["-m", "smg", "launch"]),
    "sglang-router": ("sglang_router", ["-m", "sglang_router.launch_router"]),
}


class RouterSpecError(PdControllerError, ValueError):
    """The router setting names nothing this machine can start."""


@dataclass(frozen=True)
class RouterKind:
    name: str  # smg | sglang-router | custom
    argv: tuple[str, ...]  # the command before the PD flags (custom: with "{args}" where they go)
    dialect: str  # "smg" | "legacy" | "unknown": what its /workers registry speaks (router actuator's dialect)

    @property
    def label(self) -> str:
        return self.name if self.name != "custom" else " ".join(self.argv)


def resolve(spec: str | None = None) -> RouterKind:
    """`spec`, else $PD_ROUTER, else smg. Raises RouterSpecError naming the value when it cannot be used."""
    raw = (spec if spec is not None else os.environ.get(ENV, "")).strip() or DEFAULT_ROUTER
    if raw in KNOWN:
        module, args = KNOWN[raw]
        if importlib.util.find_spec(module) is None:
            pkg = "smg" if raw == "smg" else "sglang-router"
            raise RouterSpecError(f"router={raw!r}: the Python package {pkg!r} is not installed "
                                  f"(pip install {pkg}, or pip install -e '.[demo]')")
        return RouterKind(raw, (sys.executable, *args), "smg" if raw == "smg" else "legacy")
    try:
        argv = tuple(shlex.split(raw))
    except ValueError as e:
        raise RouterSpecError(f"router={raw!r}: not a command line ({e})") from None
    if not argv:
        raise RouterSpecError(f"router={raw!r}: expected 'smg', 'sglang-router' or a command line")
    return RouterKind("custom", argv, "unknown")


def router_command(
    kind: RouterKind,
    *,
    host: str,
    port: int,
    prometheus_port: int,
    prefill: Sequence[tuple[str, int | None]],
    decode: Sequence[str],
    policy: str = "round_robin",
    health_check_interval_s: int = 1,
    model_aliases: Sequence[tuple[str, str]] = (),
    extra: Sequence[str] = (),
) -> list[str]:
    """The full command line that starts `kind` in PD mode over these workers."""
    args = [
        "--pd-disaggregation", "--host", host, "--port", str(port),
        "--prometheus-host", host, "--prometheus-port", str(prometheus_port),
        "--policy", policy, "--health-check-interval-secs", str(health_check_interval_s),
        "--shutdown-grace-period-secs", "1", "--log-level", "warn",
    ]
    for url, bport in prefill:
        args += ["--prefill", url] + ([str(bport)] if bport is not None else [])
    for url in decode:
        args += ["--decode", url]
    if kind.name == "smg":
        args += ["--load-monitor-interval", "1"]
        for alias, served in model_aliases:
            args += ["--model-alias", f"{alias}={served}"]
    args += list(extra)
    if kind.name == "custom" and any("{args}" in a for a in kind.argv):
        out: list[str] = []
        for a in kind.argv:
            out += args if a == "{args}" else [a.replace("{args}", shlex.join(args))]
        return out
    return [*kind.argv, *args]
