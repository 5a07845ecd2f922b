"""HTTP plumbing shared by the router and worker clients: one session, errors mapped to the hierarchy.

A 5xx, a timeout or a refused connection is transient (retry with backoff);
a 4xx is a refusal (do not retry); a 2xx with an unexpected body is a refusal
too, naming what was wrong.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp

from controller.actuators.errors import ActuationError, TransientError


class Http:
    def __init__(self, timeout_s: float) -> None:
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(
        self,
        method: str,
        url: str,
        *,
        op: str,
        target: str,
        refusal: type[ActuationError],
        json_body: Any = None,
        ok: tuple[int, ...] = (200, 201, 202, 204),
        timeout_s: float | None = None,
    ) -> tuple[int, Any]:
        # aiohttp reads timeout=None as "no timeout": pass one only to override the session's
        extra: dict[str, Any] = {} if timeout_s is None else {"timeout": aiohttp.ClientTimeout(total=timeout_s)}
        try:
            async with self.session().request(method, url, json=json_body, **extra) as resp:
                text = await resp.text()
                status = resp.status
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            why = "timed out" if isinstance(e, asyncio.TimeoutError) else f"{type(e).__name__}: {e}"
            raise TransientError(op, target, why) from None
        if status >= 500:
            raise TransientError(op, target, _short(text), status=status)
        if status not in ok:
            raise refusal(op, target, _short(text), status=status)
        if not text:
            return status, None
        try:
            return status, json.loads(text)
        except ValueError:
            return status, text


def _short(text: str, n: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."
