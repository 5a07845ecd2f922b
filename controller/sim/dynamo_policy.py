"""`simulate --policy dynamo`: NVIDIA Dynamo's own planner engine as a simulator policy.

Not an imitation (that is the `throughput` baseline in policies.py): this runs
the planner code from the `ai-dynamo` 1.6.1 wheel (Apache-2.0) in-process, the
same `OrchestratorEngineAdapter` Dynamo runs live and in its offline replay,
on the simulator's virtual time (`VirtualClock`), with no etcd, NATS or
Kubernetes. Install: see docs/profiles.md (the `dynamo` extra; `ai-dynamo` needs
`--no-deps` here, and `controller/sim/_dynamo_compat` stands in for its
`aisimulate_core` dependency on top of aiconfigurator-core).

What it is fed, and how that matches the other policies:
- Profile: the run's profile becomes Dynamo's "benchmark forward-pass
  metrics", exactly as Dynamo converts its own pre-deployment profiling
  (dynamo/planner/monitoring/perf_metrics.py): one prefill FPM per input length
  (1 request, L tokens, wall time = prefill time), one decode FPM per grid
  point (b requests, b*c KV tokens, wall time = TPOT) that fits the KV cache.
  Dynamo's planner fits its own regression to those points and finds, per
  engine, the request rate that keeps its TTFT and ITL estimates within the
  objectives.
- Observations: the completed-request events the simulator hands every
  policy, aggregated as Dynamo's frontend metrics are (requests in the
  adjustment window, mean ISL and OSL, KV hit rate = cached / input tokens),
  given to the planner only on the ticks that ask for traffic; worker counts
  from the fleet view (ready = serving, expected = committed, in progress while
  they differ). No forward-pass metrics from the simulated engines (the
  simulator does not model single forward passes), so Dynamo's load-based
  scaling, which needs them, is off; its throughput-based scaling is on.
- Objectives: ttft_ms = the TTFT objective less the profile's fixed overhead
  (Dynamo's TTFT is the engine's), itl_ms = the TPOT objective.
- Actions: `scale_to` targets through the same simulated fleet: scale actions
  in elastic mode. Dynamo's GPU budget is a cap, not an allocation, so in
  fixed-budget mode (every instance serves) its latest P:D target ratio splits
  the budget, and the difference becomes flips.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from controller.core.control import Action, Mode, Observations, Reason, Role
from controller.core.errors import PdControllerError
from controller.sim.policies import Policy, SimContext, _to_actions

INSTALL_HINT = (
    "simulate --policy dynamo needs NVIDIA Dynamo's planner: in its own virtual environment, "
    "pip install 'pd-controller[dynamo]' and then pip install --no-deps ai-dynamo==1.6.1 ai-dynamo-runtime==1.6.1 "
    "(see docs/profiles.md)"
)
COMPAT_DIR = Path(__file__).resolve().parent / "_dynamo_compat"


def _ensure_aisimulate_core() -> None:
    """A real aisimulate_core wins; else our stand-in over aiconfigurator-core (see _dynamo_compat/README.md)."""
    if importlib.util.find_spec("aisimulate_core") is None and str(COMPAT_DIR) not in sys.path:
        sys.path.append(str(COMPAT_DIR))


def _dynamo() -> dict[str, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for mod in ("dynamo", "aiconfigurator_core"):
        if importlib.util.find_spec(mod) is None:
            raise PdControllerError(f"{INSTALL_HINT} ({mod} is not installed)")
    _ensure_aisimulate_core()
    try:
        fpm = importlib.import_module("dynamo.common.forward_pass_metrics")
        cfg = importlib.import_module("dynamo.planner.config.planner_config")
        types = importlib.import_module("dynamo.planner.core.types")
        clock = importlib.import_module("dynamo.planner.plugins.clock")
        adapter = importlib.import_module("dynamo.planner.plugins.orchestrator.engine_adapter")
    except ModuleNotFoundError as e:
        raise PdControllerError(f"{INSTALL_HINT} (dynamo's planner imports {e.name}, which is not installed)") from None
    # the planner logs every tick at INFO; a simulation runs thousands
    for name in ("dynamo", "dynamo.planner", "dynamo.common"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return {"fpm": fpm, "cfg": cfg, "types": types, "clock": clock, "adapter": adapter}


def benchmark_fpms(profile: Any, fpm: Any) -> tuple[list[Any], list[Any]]:
    """The profile as Dynamo's benchmark forward-pass metrics (its own profiling conversion)."""
    FPM, Sched = fpm.ForwardPassMetrics, fpm.ScheduledRequestMetrics
    pre = profile.prefill
    lens = pre.input_len if pre.input_len else (128, 512, 2048, 8192)
    prefill = [FPM(wall_time=float(pre.time_s(L)), scheduled_requests=Sched(num_prefill_requests=1, sum_prefill_tokens=int(L)))
               for L in lens]
    decode = []
    d = profile.decode_curve
    if d is None:
        # a fixed operating point: tps at the TPOT target -> one batch b = tps * tpot at a nominal context
        tpot = float(profile.decode_fixed_at_tpot_ms or 20.0)
        b = max(1, round(float(profile.decode_fixed_tps) * tpot / 1000.0))
        for c in (1024, 4096):
            decode.append(FPM(wall_time=tpot / 1000.0, scheduled_requests=Sched(num_decode_requests=b, sum_decode_kv_tokens=b * c)))
        return prefill, decode
    cap = d.kv_capacity_tokens or math.inf
    for i, c in enumerate(d.context):
        for j, b in enumerate(d.batch):
            if b * c <= cap:
                decode.append(FPM(wall_time=d.tpot_ms[i][j] / 1000.0,
                                  scheduled_requests=Sched(num_decode_requests=int(b), sum_decode_kv_tokens=int(b * c))))
    return prefill, decode


class DynamoPolicy(Policy):
    """NVIDIA Dynamo 1.6.1's planner (throughput-based SLA mode), in-process on virtual time."""

    name = "dynamo"
    interval_s = 60.0  # Dynamo's default throughput adjustment interval

    def __init__(self, ctx: SimContext) -> None:
        super().__init__(ctx)
        m = _dynamo()
        self._m = m
        prof = ctx.profile
        obj = ctx.spec.objectives
        gp, gd = prof.prefill_gpus_per_instance, prof.decode_gpus_per_instance
        prm = ctx.spec.params
        budget = (ctx.instances_budget or 0) * max(gp, gd)
        cfg_kw: dict[str, Any] = dict(
            mode="disagg", optimization_target="sla", backend="sglang",
            ttft_ms=max(1.0, (obj.ttft_s - prof.overhead_s) * 1000.0), itl_ms=obj.tpot_ms,
            throughput_adjustment_interval_seconds=int(self.interval_s),
            enable_throughput_scaling=True, enable_load_scaling=False, load_predictor="constant",
            prefill_engine_num_gpu=gp, decode_engine_num_gpu=gd, min_endpoint=1, environment="virtual",
            max_gpu_budget=budget if ctx.mode is Mode.FIXED and budget else (prm.max_prefill * gp + prm.max_decode * gd),
        )
        try:
            self.config = m["cfg"].PlannerConfig(**cfg_kw)
        except Exception as e:  # pydantic ValidationError: say which field
            raise PdControllerError(f"dynamo planner config rejected: {str(e).splitlines()[0]}") from None
        T = m["types"]
        kv = int(prof.decode_curve.kv_capacity_tokens) if prof.decode_curve and prof.decode_curve.kv_capacity_tokens else None
        caps = T.WorkerCapabilities(
            prefill=T.EngineCapabilities(num_gpu=gp, max_num_batched_tokens=16384, max_num_seqs=256, max_kv_tokens=kv),
            decode=T.EngineCapabilities(num_gpu=gd, max_num_batched_tokens=16384, max_num_seqs=256, max_kv_tokens=kv),
        )
        self.engine = m["adapter"].OrchestratorEngineAdapter(self.config, caps, clock=m["clock"].VirtualClock())
        self.loop = asyncio.new_event_loop()
        pre, dec = benchmark_fpms(prof, m["fpm"])
        self.loop.run_until_complete(self.engine.bootstrap_from_fpms(prefill_fpms=pre, decode_fpms=dec))
        self.pending = self.engine.initial_tick(0.0)
        self.window: list[np.ndarray] = []
        self.window_start = 0.0
        self.last: dict[str, Any] | None = None  # the last throughput tick's diagnostics
        self.target: tuple[int, int] | None = None  # the planner's latest (P, D) target

    def _traffic(self, now: float) -> Any:
        ev = np.concatenate(self.window) if self.window else None
        self.window = []
        dur = max(now - self.window_start, 1e-9)
        self.window_start = now
        if ev is None or ev.size == 0:
            return self._m["types"].TrafficObservation(duration_s=dur, num_req=0.0, isl=0.0, osl=0.0, kv_hit_rate=None)
        inp = ev["input_tokens"].astype(np.float64)
        hit = float(ev["cached_tokens"].sum() / inp.sum()) if inp.sum() > 0 else 0.0
        return self._m["types"].TrafficObservation(
            duration_s=dur, num_req=float(ev.size), isl=float(inp.mean()),
            osl=float(ev["output_tokens"].astype(np.float64).mean()), kv_hit_rate=hit,
        )

    def decide(self, now: float, obs: Observations) -> list[Action]:
        if obs.events.size:
            self.window.append(obs.events[["arrival_s", "input_tokens", "cached_tokens", "output_tokens"]])
        fleet = obs.fleet
        cur_p, cur_d = fleet.committed(Role.PREFILL), fleet.committed(Role.DECODE)
        T = self._m["types"]
        want_p = want_d = None
        while self.pending is not None and self.pending.at_s <= now + 1e-9:
            tk = self.pending
            counts = T.WorkerCounts(
                ready_num_prefill=fleet.serving_prefill, ready_num_decode=fleet.serving_decode,
                expected_num_prefill=cur_p, expected_num_decode=cur_d,
                prefill_scaling_in_progress=cur_p != fleet.serving_prefill,
                decode_scaling_in_progress=cur_d != fleet.serving_decode,
            )
            traffic = self._traffic(tk.at_s) if tk.need_traffic_metrics else None
            eff = self.loop.run_until_complete(self.engine.tick(tk, T.TickInput(now_s=tk.at_s, traffic=traffic, worker_counts=counts)))
            if tk.run_throughput_scaling:
                self.last = {k: v for k, v in vars(eff.diagnostics).items() if v is not None and not isinstance(v, list | dict)}
            if eff.scale_to is not None:
                want_p = eff.scale_to.num_prefill if eff.scale_to.num_prefill is not None else want_p
                want_d = eff.scale_to.num_decode if eff.scale_to.num_decode is not None else want_d
            self.pending = eff.next_tick
        if want_p is not None or want_d is not None:
            self.target = (cur_p if want_p is None else int(want_p), cur_d if want_d is None else int(want_d))
        prm = self.ctx.spec.params
        if self.ctx.mode is Mode.FIXED:
            # Dynamo's GPU budget is a cap, not an allocation: it sizes P and D for the load and leaves the
            # rest idle. With a fixed budget every instance serves, so keep the planner's P:D ratio and
            # split the budget by it (re-applied while the planner's target stands).
            if self.target is None:
                return []
            n = self.ctx.instances_budget or (cur_p + cur_d)
            tp, td = max(self.target[0], 1), max(self.target[1], 1)
            wp = min(max(round(n * tp / (tp + td)), 1), n - 1)
            return _to_actions(cur_p, cur_d, wp, n - wp, self.ctx.mode, Reason.REBALANCE)
        if want_p is None and want_d is None:
            return []
        wp = cur_p if want_p is None else min(max(int(want_p), prm.min_prefill, 1), prm.max_prefill)
        wd = cur_d if want_d is None else min(max(int(want_d), prm.min_decode, 1), prm.max_decode)
        return _to_actions(cur_p, cur_d, wp, wd, self.ctx.mode, Reason.REBALANCE)

    def close(self) -> None:
        self.loop.run_until_complete(self.engine.shutdown())
        self.loop.close()
