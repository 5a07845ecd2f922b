"""What the HTTP API needs from the controller: a small view, so the API never imports the runtime.

`controller.runtime.sidecar.Sidecar` satisfies it; tests may pass any object
that does. The API reads through it and changes nothing but the pause flag.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from controller.config import Config


@runtime_checkable
class ControllerView(Protocol):
    # the validated configuration: the api section, and the base inputs of what-if plans
    cfg: Config
    # the resolved bearer token (api.token or the environment variable), or None: mutations closed
    token: str | None

    def state(self) -> dict[str, Any]:
        """The JSON-able body of GET /v1/state."""
        ...

    def ready(self) -> tuple[bool, str]:
        """(ready, reason) for GET /readyz."""
        ...

    def metrics_exposition(self) -> bytes:
        """The Prometheus text exposition of the controller's registry."""
        ...

    def set_paused(self, paused: bool) -> dict[str, Any]:
        """Advisory on (True) or off (False); the JSON-able answer (paused, mode, note)."""
        ...
