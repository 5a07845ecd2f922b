"""The reconciler: after any fault, one consistent fleet, retried with backoff, never given up silently.

A flip touches three records of the fleet: the router's registry, what the
worker (and its agent) serves, and the flip journal. A fault at any step
(controller, worker, agent or router killed) can leave them disagreeing: a
healthy worker out of the router, a worker listed as decode while it serves
prefill (a router restarted with its start-up arguments lists workers in
their start-up roles), a journal entry nobody will finish. The reconciler
brings them back to one state, pass after pass, from the workers' own word:

    consistent  every known worker that can serve is listed in the pool it serves
                (its own /health and /server_info `disaggregation_mode`); one that
                cannot serve is not listed; the journal holds only flips running now

Known workers are the configured ones (bootstrap ports, agents), every URL
the router ever listed, and the journal's. Configured spares may stay
unlisted. Per worker, each pass does at most one repair:

    register    serves R, listed nowhere            -> add it to pool R
    reregister  serves R, listed as the other role  -> remove, add to pool R
    deregister  cannot serve (twice in a row), listed -> remove: out of capacity
    restart     cannot serve, has an agent          -> restart it through the agent in its
                                                       last good role (the journal's from-role,
                                                       else the role it last served)

A failed attempt backs off per worker (exponential, reset on success). Each
attempt is a log line (`reconcile_attempt`) and a metric
(`pdc_reconcile_attempts_total{action,result}`); each state change is a log
line (`reconcile_state`) and the gauge `pdc_reconcile_workers{state}`. After
`fail_after` consecutive failures, or when nothing here can restart it, a
worker is `failed`: excluded from capacity (the actuator's fleet view lists
it `state="failed"`), and still retried at the backoff cap — never dropped.

Workers a flip or a scale action is moving are left alone (`DrainedFlipper.active`
and `.busy`); a worker being repaired is refused to the flipper (`worker_repairing`).
While the controller is advisory or paused (`enabled()` False) it only checks
and reports what it would repair (`reconcile_advice`, result `advised`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

import structlog

from controller.actuators.base import Role, WorkerView
from controller.actuators.errors import ActuationError
from controller.actuators.flip import DrainedFlipper, FlipRecord, Step
from controller.actuators.metrics import ActuatorMetrics
from controller.actuators.retry import Backoff

log = structlog.get_logger("pd.actuation")
Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]
STATES = ("consistent", "repairing", "failed", "spare")


@dataclass
class WorkerState:
    url: str
    state: str = "consistent"
    last_role: Role | None = None  # the role it was last seen serving (or listed in)
    down_probes: int = 0  # consecutive probes that found it unable to serve
    failures: int = 0  # consecutive failed repair attempts
    next_at: float = 0.0  # no attempt before this (backoff)
    why: str = ""
    backoff: Backoff = field(default_factory=Backoff)


@dataclass(frozen=True)
class ReconcileReport:
    consistent: bool
    states: dict[str, str]
    actions: tuple[str, ...] = ()
    router_ok: bool = True


class Reconciler:
    def __init__(
        self,
        flipper: DrainedFlipper,
        metrics: ActuatorMetrics,
        *,
        known: Iterable[str] = (),
        spares: Callable[[], Iterable[str]] = tuple,
        can_restart: bool = False,
        interval_s: float = 3.0,
        backoff_initial_s: float = 1.0,
        backoff_max_s: float = 30.0,
        fail_after: int = 3,
        down_after: int = 2,
        clock: Clock,
        sleep: Sleep = asyncio.sleep,
        enabled: Callable[[], bool] = lambda: True,
    ) -> None:
        self.flipper = flipper
        self.enabled = enabled  # False (advisory, paused): check and report what it would repair, touch nothing
        self.router = flipper.router
        self.switcher = flipper.switcher
        self.metrics = metrics
        self.known = {u.rstrip("/") for u in known}
        self.spares = spares
        self.can_restart = can_restart
        self.interval_s = interval_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.fail_after = fail_after
        self.down_after = down_after
        self.clock = clock
        self.sleep = sleep
        self.workers: dict[str, WorkerState] = {}
        self.last: ReconcileReport | None = None
        self.router_backoff = Backoff(backoff_initial_s, backoff_max_s)
        self.passes = 0

    # ---- views -------------------------------------------------------------------------------------

    def _w(self, url: str) -> WorkerState:
        w = self.workers.get(url)
        if w is None:
            w = self.workers[url] = WorkerState(url, backoff=Backoff(self.backoff_initial_s, self.backoff_max_s))
        return w

    def excluded(self) -> dict[str, WorkerState]:
        """Workers out of capacity until repaired (state failed or repairing after a fault)."""
        return {u: w for u, w in self.workers.items() if w.state in ("failed", "repairing") and w.down_probes > 0}

    @property
    def consistent(self) -> bool:
        return self.last is not None and self.last.consistent

    def _set(self, w: WorkerState, state: str, why: str = "") -> None:
        if w.state != state:
            log.info("reconcile_state", worker=w.url, state=state, was=w.state, why=why or w.why)
        w.state = state
        w.why = why or w.why

    def _export(self) -> None:
        for s in STATES:
            self.metrics.reconcile_workers.labels(s).set(sum(1 for w in self.workers.values() if w.state == s))

    # ---- one pass ----------------------------------------------------------------------------------

    async def once(self) -> ReconcileReport:
        self.passes += 1
        now = self.clock()
        try:
            listed = {w.url: w for w in await self.router.workers()}
        except ActuationError as e:
            delay = self.router_backoff.failed()
            self.metrics.reconcile_passes.labels("router_unreachable").inc()
            self.metrics.reconcile_attempts.labels("read_router", "failed").inc()
            log.warning("reconcile_attempt", action="read_router", result="failed", why=e.why,
                        attempt=self.router_backoff.failures, retry_in_s=delay)
            self.last = ReconcileReport(False, {u: w.state for u, w in self.workers.items()}, router_ok=False)
            return self.last
        self.router_backoff.succeeded()
        spares = {s.rstrip("/") for s in self.spares()}
        journal = self.flipper.journal.records
        urls = sorted(self.known | set(listed) | set(journal) | set(self.workers))
        actions: list[str] = []
        all_ok = True
        for url in urls:
            if url in self.flipper.active or url in self.flipper.busy:
                continue  # a flip or a scale action is moving it: its own state machine owns it now
            rec = journal.get(url)
            if rec is not None and rec.step is not Step.FAILED:
                all_ok = False  # an interrupted flip: recovery (DrainedFlipper.recover) finishes or undoes it
                continue
            w = self._w(url)
            if w.next_at > now:
                all_ok = all_ok and w.state in ("consistent", "spare")
                continue
            ok, action = await self._one(w, listed.get(url), rec, url in spares)
            all_ok = all_ok and ok
            if action:
                actions.append(action)
        self._export()
        report = ReconcileReport(all_ok, {u: w.state for u, w in self.workers.items()}, tuple(actions))
        result = "consistent" if all_ok and not actions else ("repaired" if all_ok else "inconsistent")
        self.metrics.reconcile_passes.labels(result).inc()
        if actions or (self.last is not None and self.last.consistent != all_ok):
            log.info("reconcile_pass", result=result, actions=list(actions), states=report.states)
        self.last = report
        return report

    async def _one(self, w: WorkerState, listed: WorkerView | None, rec: FlipRecord | None,
                   spare: bool) -> tuple[bool, str]:
        """Check one worker and make at most one repair. (consistent now, action taken or "")."""
        url = w.url
        serves = await self.switcher.current_role(url)
        if serves is not None:
            w.down_probes = 0
            w.last_role = serves
            if listed is not None and listed.role == serves:
                return self._healed(w, rec), ""
            if listed is None and spare and rec is None:
                self._set(w, "spare")
                return True, ""
            action = "register" if listed is None else "reregister"
            return await self._attempt(w, action, serves, rec)
        # it cannot serve now (down, unhealthy, mid-restart)
        w.down_probes += 1
        if listed is not None and w.last_role is None:
            w.last_role = listed.role
        if w.down_probes < self.down_after:
            # one failed probe may be a slow answer: look again next pass before acting on it
            return False, ""
        if listed is not None:
            return await self._attempt(w, "deregister", listed.role, rec)
        want = rec.from_role if rec is not None else w.last_role
        if spare and rec is None:
            self._set(w, "spare")
            return True, ""
        if self.can_restart and want is not None:
            return await self._attempt(w, "restart", want, rec)
        # nothing here can start it: out of capacity, probed again with backoff until it answers
        return await self._attempt(w, "probe", want, rec)

    def _healed(self, w: WorkerState, rec: FlipRecord | None) -> bool:
        if rec is not None:  # a failed flip whose worker is back in a pool: repaired
            self.flipper.journal.drop(w.url)
            log.info("reconcile_repaired", worker=w.url, flip=f"{rec.from_role}->{rec.to_role}",
                     serves=w.last_role)
        w.failures = 0
        w.backoff.succeeded()
        w.next_at = 0.0
        self._set(w, "consistent", "")
        return True

    async def _attempt(self, w: WorkerState, action: str, role: Role | None, rec: FlipRecord | None,
                       ) -> tuple[bool, str]:
        url = w.url
        if not self.enabled() and action != "probe":
            # advisory or paused: the operator asked for no change to the fleet; say what would be done
            self.metrics.reconcile_attempts.labels(action, "advised").inc()
            log.info("reconcile_advice", worker=url, action=action, role=role, would=f"{action} {role or ''}".strip())
            w.next_at = self.clock() + w.backoff.failed()  # say it again later, not every pass
            return False, f"would {action} {url}"
        self.flipper.busy.add(url)
        if w.state != "failed":  # a failed worker stays failed (out of capacity) until an attempt heals it
            self._set(w, "repairing", f"{action} {role or ''}".strip())
        err = ""
        try:
            if action in ("register", "reregister"):
                assert role is not None
                await self.flipper.register(url, role, self.flipper.port_for(url, rec.bootstrap_port if rec else None))
            elif action == "deregister":
                await self.flipper.deregister(url)
            elif action == "restart":
                assert role is not None
                await self.switcher.restart(url, role, self.flipper.t.switch_s)
                await self.flipper.register(url, role, self.flipper.port_for(url, rec.bootstrap_port if rec else None))
            else:  # probe: it did not answer; nothing to do but wait for it
                err = "does not answer and no agent can restart it"
        except (TimeoutError, ActuationError) as e:
            err = str(e)
        finally:
            self.flipper.busy.discard(url)
        done = f"{action} {url}" + (f" as {role}" if role and action != "deregister" else "")
        if not err:
            self.metrics.reconcile_attempts.labels(action, "ok").inc()
            log.info("reconcile_attempt", worker=url, action=action, role=role, result="ok",
                     attempt=w.failures + 1)
            if action == "deregister":
                # out of the router and out of capacity until it answers again (then it is re-registered)
                w.failures = 0
                w.backoff.succeeded()
                self._set(w, "failed" if not self.can_restart else "repairing", "cannot serve; deregistered")
                return False, done
            return self._healed(w, rec), done
        w.failures += 1
        delay = w.backoff.failed()
        w.next_at = self.clock() + delay
        self.metrics.reconcile_attempts.labels(action, "failed").inc()
        log.warning("reconcile_attempt", worker=url, action=action, role=role, result="failed", why=err[:300],
                    attempt=w.failures, retry_in_s=delay)
        if w.failures >= self.fail_after or action == "probe":
            self._set(w, "failed", err[:200])
        return False, f"{done}: failed"

    # ---- the task ----------------------------------------------------------------------------------

    async def run(self, before: Callable[[], Awaitable[None]] | None = None) -> None:
        """Forever: one pass every interval_s (sooner is pointless: backoff paces repairs). Never raises."""
        while True:
            try:
                if before is not None:
                    await before()
                await self.once()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a bug in a pass must not end healing: log, count, go on
                self.metrics.reconcile_passes.labels("error").inc()
                log.error("reconcile_pass_failed", error=repr(e)[:300])
            await self.sleep(self.interval_s)

    async def until_consistent(self, timeout_s: float, poll_s: float = 0.5) -> ReconcileReport:
        """Tests and benches: pass after pass (each worker's backoff respected) until consistent or timeout."""
        deadline = self.clock() + timeout_s
        while True:
            r = await self.once()
            if r.consistent or self.clock() >= deadline:
                return r
            with contextlib.suppress(Exception):
                await self.sleep(poll_s)
