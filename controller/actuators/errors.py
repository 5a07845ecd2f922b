"""Actuation errors: a small hierarchy with structured fields.

Every error names the operation, the target and why; `retryable` tells the
retry loop whether trying again can help (a 5xx or a timeout can, a 4xx or a
refused precondition cannot).
"""

from __future__ import annotations

from controller.core.errors import PdControllerError


class ActuationError(PdControllerError):
    """Base of every actuation failure."""

    retryable = False

    def __init__(self, op: str, target: str, why: str, *, status: int | None = None) -> None:
        self.op = op
        self.target = target
        self.why = why
        self.status = status
        code = f" (HTTP {status})" if status is not None else ""
        super().__init__(f"{op} {target}: {why}{code}")


class TransientError(ActuationError):
    """A call failed in a way that may pass: 5xx, timeout, connection refused."""

    retryable = True


class RouterError(ActuationError):
    """The router answered, but refused (4xx) or answered something unexpected."""


class WorkerError(ActuationError):
    """A worker refused or failed a request (role switch refused, unhealthy)."""


class AgentError(ActuationError):
    """A node agent refused a command, failed it, or did not answer."""


class KubernetesError(ActuationError):
    """The Kubernetes API refused or failed a call."""
