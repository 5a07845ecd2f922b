"""Client of one SGLang worker: health, load (to know it is idle), role switch, request counter.

`/get_load` shapes seen in SGLang: a list with one entry per DP rank
(`num_reqs`, `num_waiting_reqs`, ...) or a single object with `num_reqs`
or `load`. Idle means zero running and zero waiting on every rank.
"""

from __future__ import annotations

import math
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from controller.actuators.base import Role
from controller.actuators.errors import TransientError, WorkerError
from controller.actuators.http import Http
from controller.actuators.retry import Retrier


def load_of(body: Any) -> int:
    """Requests running + waiting on a worker, from its /get_load answer."""
    entries = body if isinstance(body, list) else [body]
    total = 0
    seen = False
    for e in entries:
        if not isinstance(e, dict):
            continue
        for k in ("num_reqs", "num_waiting_reqs", "load"):
            v = e.get(k)
            if isinstance(v, int | float) and not isinstance(v, bool):
                total += int(v)
                seen = True
    if not seen:
        raise WorkerError("get_load", "worker", f"unrecognised /get_load body: {str(body)[:120]}")
    return total


def counter_total(text: str, names: tuple[str, ...]) -> float:
    """Sum of the named counters (any labels) in a Prometheus exposition."""
    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name in names and math.isfinite(s.value):
                total += s.value
    return total


# counters that grow with each request a worker serves; `_total` is the sample name
REQUEST_COUNTERS = (
    "sglang:num_requests_total",
    "sglang:prompt_tokens_total",
    "sglang:generation_tokens_total",
)


class WorkerClient:
    def __init__(self, http: Http, retrier: Retrier) -> None:
        self.http = http
        self.retrier = retrier

    async def healthy(self, url: str) -> bool:
        try:
            await self.http.request("GET", f"{url}/health", op="health", target=url, refusal=WorkerError)
        except (TransientError, WorkerError):
            return False
        return True

    async def load(self, url: str) -> int:
        async def call() -> int:
            _, body = await self.http.request("GET", f"{url}/get_load", op="get_load", target=url, refusal=WorkerError)
            return load_of(body)

        return await self.retrier.call("get_load", url, call)

    async def served(self, url: str) -> float:
        """A monotone count of work served (request/token counters from /metrics)."""

        async def call() -> float:
            _, body = await self.http.request("GET", f"{url}/metrics", op="metrics", target=url, refusal=WorkerError)
            return counter_total(body if isinstance(body, str) else "", REQUEST_COUNTERS)

        return await self.retrier.call("metrics", url, call)

    async def requests(self, url: str) -> float:
        """Requests this worker has served (`sglang:num_requests_total`): a count, for the verify evidence."""

        async def call() -> float:
            _, body = await self.http.request("GET", f"{url}/metrics", op="metrics", target=url, refusal=WorkerError)
            return counter_total(body if isinstance(body, str) else "", ("sglang:num_requests_total",))

        return await self.retrier.call("metrics", url, call)

    async def role_switch(self, url: str, to_role: Role, timeout_s: float | None = None) -> str:
        """SGLang's in-place switch. Same role = no-op success; "not idle" and failures raise WorkerError.

        The call returns when the rebuild is done, which can take far longer than an ordinary request:
        it gets its own timeout (the flip's switch budget)."""

        async def call() -> Any:
            _, body = await self.http.request(
                "POST", f"{url}/pd_role_switch", op="role_switch", target=url, refusal=WorkerError,
                json_body={"new_role": to_role}, timeout_s=timeout_s,
            )
            return body

        body = await self.retrier.call("role_switch", url, call)
        if not isinstance(body, dict) or not body.get("success"):
            msg = body.get("message") if isinstance(body, dict) else body
            raise WorkerError("role_switch", url, f"refused: {msg}")
        return str(body.get("message", ""))
