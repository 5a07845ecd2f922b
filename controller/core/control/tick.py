"""One control tick: (state, observations, spec, now) -> (actions, new state, diagnostics).

Pure: no clock is read, nothing is mutated; the same function runs live in
the sidecar, inside the simulator on virtual time, and in tests.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from controller.core.backlog import decode_arrivals_need, prefill_backlog_need, priced_requests
from controller.core.control import stages
from controller.core.control.calibration import (
    CalibrationState,
    update_decode,
    update_prefill,
    update_prefill_busy,
)
from controller.core.control.estimators import (
    ARRIVAL_HISTORY,
    ArrivalWindow,
    EventWindow,
    arrival_scv,
    estimate,
    from_arrivals,
    input_quantiles,
    thinned,
)
from controller.core.control.feedback import Burn, FeedbackState, breaching, measure_burn, update_feedback
from controller.core.control.forecast import ForecastState, forecast, update
from controller.core.control.model import Shape, model_target, sticky_shape, workload_shape
from controller.core.control.params import ControlSpec, Mode
from controller.core.control.safety import (
    FleetHistory,
    RateHist,
    consolidation_ok,
    held_rate,
    record_rate,
    safe_down_floor,
)
from controller.core.control.types import (
    Action,
    ActionKind,
    Decision,
    Diagnostics,
    Estimates,
    FeedbackView,
    FleetView,
    FloatArray,
    Forecast,
    ModelTarget,
    Observations,
    Reason,
    Role,
)
from controller.core.errors import InfeasibleError, ModelInputError
from controller.core.prefill import service_time


@dataclass(frozen=True)
class ControllerState:
    start_s: float
    last_tick_s: float | None = None
    window: EventWindow = field(default_factory=EventWindow.empty)
    arrivals: ArrivalWindow = field(default_factory=ArrivalWindow)
    in_flight: tuple[tuple[float, int], ...] = ()
    forecaster: ForecastState = field(default_factory=ForecastState)
    calibration: CalibrationState = field(default_factory=CalibrationState)
    recs_prefill: stages.Recs = ()
    recs_decode: stages.Recs = ()
    recs_split: stages.Recs = ()
    # what the fleet was observed to do (flip starts, membership changes): never the proposals
    history: FleetHistory = field(default_factory=FleetHistory)
    feedback: FeedbackState = field(default_factory=FeedbackState)
    rates: RateHist = ()  # observed load, held for safe scale-down
    observed_needs: tuple[tuple[float, float], ...] = ()  # (time, decode need from the running batch)
    busy: tuple[tuple[float, float], ...] = ()  # (time, busy instances = busy share x serving prefill)
    # (time, prefill need, decode need) read from the arrivals (core/backlog.py), held for scale-down
    backlogs: tuple[tuple[float, float, float], ...] = ()
    last_estimates: Estimates | None = None
    shape: Shape | None = None  # workload shape the capacity was last computed for (sticky)
    ticks: int = 0


@dataclass(frozen=True)
class TickResult:
    actions: tuple[Action, ...]
    state: ControllerState
    diagnostics: Diagnostics


ResultFn = Callable[[list[Action], ControllerState, ModelTarget | None, int | None, int | None], TickResult]


@dataclass(frozen=True)
class Context:
    """What the decision stages read besides the target: observed history, burn and pool gauges."""

    history: FleetHistory
    burn: Burn | None
    prefill_busy: float | None  # observed utilisation, for the consolidation check
    decode_batch: float | None
    prefill_util_target: float | None  # the model's per-instance utilisation at the objective
    held_prefill_need: float  # instances the peak load held over the regrow time needs (model, no headroom)
    held_decode_need: float
    held_prefill_backlog: float = 0.0  # the highest arrival-curve need of the regrow time (instances, no headroom)
    held_decode_backlog: float = 0.0
    # what each pool needs for the load observed now (not the forecast): a flip may take a serving
    # instance only while the serving rest carries this; cold starts still pending serve nothing yet
    now_prefill_need: float = 0.0
    now_decode_need: float = 0.0
    # prefill instances the forecast maximum needs with the busy-share cap on it (headroom included):
    # the plan grows on the pooled model at the forecast and the cap at the load observed, but gives an
    # instance up (scale-down, flip donation) only where this stricter view agrees. Growing on the
    # stricter view costs GPU-hours all along; shrinking on the looser one, when the load or the length
    # mix then rises, costs a cold start of misses
    shrink_prefill_need: float = 0.0


def initial_state(cfg: ControlSpec, now: float) -> ControllerState:
    return ControllerState(start_s=now)


def _trim_in_flight(hist: tuple[tuple[float, int], ...], keep_from: float) -> tuple[tuple[float, int], ...]:
    # keep the newest sample at or before keep_from, so the window start always has a value
    idx = 0
    for i, (t, _) in enumerate(hist):
        if t <= keep_from:
            idx = i
    return hist[idx:]


def _thin(est: Estimates, cfg: ControlSpec, arrived: int = 0) -> str | None:
    """Why the window is too thin to act on, or None. Arrivals count as samples: after a shift to
    long streams few requests complete for a while, but the arrival events keep saying what comes in."""
    p = cfg.params
    if est.window_covered_s < 0.5 * p.window_s:
        return f"window covers {est.window_covered_s:.0f}s of {p.window_s:.0f}s"
    if max(est.samples, arrived) < p.min_samples:
        return f"{max(est.samples, arrived)} samples < min_samples={p.min_samples}"
    if est.newest_age_s > p.max_age_s:
        return f"newest sample {est.newest_age_s:.0f}s old > max_age_s={p.max_age_s:.0f}"
    return None


def _calibrate(
    st: CalibrationState, win: EventWindow, est: Estimates, obs: Observations, cfg: ControlSpec,
    samples: tuple[float, ...], now: float, stable: bool, busy_instances: float | None,
) -> CalibrationState:
    p = cfg.params
    fleet = obs.fleet
    t0 = now - p.window_s
    w = win.since(t0)
    if stable and len(w) >= p.min_samples and fleet.serving_prefill > 0 and samples:
        raw = service_time(cfg.hardware.profile.prefill, samples, est.cache_hit_rate)
        svc = cfg.hardware.queueing.group_service(raw)
        per_q = est.arrival_rate_rps / fleet.serving_prefill / cfg.hardware.queueing.dp_groups
        observed = float(np.mean(w.ttft_s)) - cfg.objectives.overhead_s
        if busy_instances is not None:
            # the measured busy time fits the service scale; the mean model only reports its error.
            # Busy time and arrivals are both averaged over the window: on on/off traffic a tick's busy
            # share against a window's rate would read a burst as a slow service.
            st = update_prefill(st, per_q, svc, observed, replace(p, calibrate=False)) if per_q > 0 and observed > 0 else st
            share = busy_instances / fleet.serving_prefill
            st = update_prefill_busy(st, est.arrival_rate_rps, fleet.serving_prefill, share, raw, p)
        elif per_q > 0 and observed > 0:
            # no busy gauge: fit the mean sojourn of N separate queues. With N > 1 and pooled
            # routing that fit is biased toward a faster service, so it may only slow the profile down.
            before = st.prefill_scale
            st = update_prefill(st, per_q, svc, observed, p)
            if fleet.serving_prefill > 1 and st.prefill_scale < min(before, 1.0):
                st = replace(st, prefill_scale=min(before, 1.0))
    curve = cfg.hardware.profile.decode_curve
    b, t = obs.stats.decode_running_mean, obs.stats.decode_tpot_ms_mean
    if curve is not None and b is not None and t is not None and b >= 1 and not math.isnan(est.input_len_mean):
        prof_t = curve.tpot_ms_at(b, est.input_len_mean + est.output_len_mean / 2.0)
        st = update_decode(st, prof_t, t, p)
    return st


def tick(state: ControllerState, obs: Observations, cfg: ControlSpec, now: float) -> TickResult:
    p = cfg.params
    fleet: FleetView = obs.fleet
    decisions: list[Decision] = []

    # --- observe -------------------------------------------------------------------------
    history = state.history.observe(fleet, now)
    window = state.window.extended(obs.events, now, p.window_s)
    hist = state.in_flight
    if obs.stats.in_flight is not None:
        hist = _trim_in_flight((*hist, (now, int(obs.stats.in_flight))), now - p.window_s)
    lag = float(np.quantile(thinned(window.done_s - window.arrival_s), 0.9)) if len(window) else 0.0
    est = estimate(window, now, state.start_s, p.window_s, hist, state.last_estimates,
                   p.burst_bin_s, p.burst_quantile, min(lag, p.window_s / 2))
    arrivals = state.arrivals.extended(obs.arrivals, now, ARRIVAL_HISTORY * p.window_s)
    covered_arrivals = arrivals.first_s is not None and now - arrivals.first_s >= 0.5 * p.window_s
    thin = _thin(est, cfg, arrivals.count_since(now - p.window_s) if covered_arrivals else 0)
    good = state.last_estimates
    if thin is not None and good is not None:
        # a handful of samples says little about lengths: size with the last well-sampled ones
        est = replace(
            est, input_len_mean=good.input_len_mean, input_len_m2=good.input_len_m2,
            input_len_p50=good.input_len_p50, input_len_p90=good.input_len_p90,
            output_len_mean=good.output_len_mean, output_len_p90=good.output_len_p90,
            cache_hit_rate=good.cache_hit_rate, lengths_from_history=True,
        )
    # arrivals lead completions by a request lifetime: rate, burst peak and exact input lengths from them
    arrival_samples: tuple[float, ...] | None = None
    if thin is None or good is not None:
        # requests of the last median lifetime are mostly still streaming: their max_tokens lead outputs
        life = float(np.median(thinned(window.done_s - window.arrival_s))) if len(window) else 0.0
        est, arrival_samples = from_arrivals(est, arrivals, now, p.window_s, p.min_samples,
                                             p.burst_bin_s, p.burst_quantile,
                                             min(max(life, p.window_s / 4), p.window_s / 2),
                                             good.output_len_p90 if good is not None else math.nan)
    have_lengths = not math.isnan(est.input_len_mean)
    fc_state = state.forecaster
    covered = est.window_covered_s >= 0.5 * p.window_s
    if covered:
        fc_state = update(fc_state, est.arrival_rate_rps, now, p)
    samples = input_quantiles(window, now - p.window_s) or (
        (est.input_len_mean,) if have_lengths else ()
    )
    if thin is not None and good is not None and state.shape is not None:
        samples = state.shape[3]
    if arrival_samples is not None:
        samples = arrival_samples
    # calibrate once the serving counts have held for half a window (pending cold starts do not
    # serve, so they do not freeze it: an error found during an outage is corrected during it)
    stable = now - history.last_change_s >= p.window_s / 2
    busy_hist = state.busy
    if obs.stats.prefill_busy_fraction is not None:
        busy_hist = (*tuple(b for b in busy_hist if b[0] > now - p.window_s),
                     (now, obs.stats.prefill_busy_fraction * fleet.serving_prefill))
    busy_mean = float(np.mean([b for _, b in busy_hist])) if busy_hist and obs.stats.prefill_busy_fraction is not None \
        and now - busy_hist[0][0] >= p.window_s / 2 else None
    calib = _calibrate(state.calibration, window, est, obs, cfg, samples, now, stable, busy_mean) \
        if thin is None else state.calibration
    w = window.since(now - p.window_s)
    burn = measure_burn(w.ttft_s, w.tpot_s, cfg.objectives, p)
    gate = getattr(obs.stats, "decode_gate_waiting", None)
    # anti-windup: misses in a window that saw the fleet change were (partly) the old fleet's
    settled = now - history.last_change_s >= p.window_s
    horizon = p.flip_lead_s if p.mode is Mode.FIXED else p.cold_start_s
    fc: Forecast = forecast(fc_state, now, horizon, p)
    # an unspent error budget may lower decode's headroom below 1 (feedback.py): elastic only (a fixed
    # budget's GPUs are paid for either way), never before one regrow time has been observed, and not
    # while the load trends up by more than the tolerance band within one lead time
    rising = fc.trend_rps_per_s * p.lead_s > p.tolerance * max(fc.level_rps, 1e-9)
    relax = p.mode is Mode.ELASTIC and p.decode_slack_min < 1.0 and now - state.start_s >= p.regrow_hold_s \
        and not rising
    feedback = update_feedback(
        state.feedback, burn, now, p,
        prefill_growing=not settled or any(t.target_role is Role.PREFILL for t in fleet.transitions),
        decode_growing=not settled or any(t.target_role is Role.DECODE for t in fleet.transitions),
        ttft_is_decode=bool(gate) and (obs.stats.prefill_queued or 0) == 0, relax_decode=relax,
    )
    rates = record_rate(state.rates, now, est.arrival_rate_rps, est.peak_rate_rps, p.regrow_hold_s) \
        if covered else state.rates

    new_state = replace(
        state, last_tick_s=now, window=window, in_flight=hist, forecaster=fc_state, calibration=calib,
        last_estimates=est if thin is None else state.last_estimates, ticks=state.ticks + 1,
        history=history, feedback=feedback, rates=rates, arrivals=arrivals, busy=busy_hist,
    )
    cur_p, cur_d = fleet.committed(Role.PREFILL), fleet.committed(Role.DECODE)

    def result(actions: list[Action], st: ControllerState, target: ModelTarget | None,
               dp: int | None, dd: int | None) -> TickResult:
        if not actions and not decisions:
            decisions.append(Decision("fleet", Reason.STEADY))
        tpmax = None
        if have_lengths:
            tpmax = cfg.hardware.profile.prefill.max_tps_at(max(est.input_len_mean * (1 - est.cache_hit_rate), 1.0))
        fb = None
        if burn is not None:
            fb = FeedbackView(burn.samples, burn.ttft_observed_q_s, predicted_q, burn.tpot_observed_q_ms,
                              burn.ttft_burn, burn.tpot_burn, feedback.prefill_headroom, feedback.decode_headroom)
        diag = Diagnostics(now, est, fc, target, calib.view(tpmax), dp, dd, tuple(decisions), fb)
        return TickResult(tuple(actions), st, diag)

    predicted_q: float | None = None
    if not have_lengths or (thin is not None and good is None):
        # nothing well-sampled yet (start-up): no action at all on a few seconds of data
        decisions.append(Decision("fleet", Reason.INSUFFICIENT_DATA, thin or "no completed requests yet"))
        return result([], new_state, None, cur_p, cur_d)

    # --- model target --------------------------------------------------------------------
    shape = state.shape if (thin is not None and state.shape is not None and arrival_samples is None) else sticky_shape(
        state.shape, workload_shape(est.input_len_mean, est.output_len_mean, est.cache_hit_rate, samples))
    new_state = replace(new_state, shape=shape)
    reqs = _window_requests(cfg, arrivals if covered_arrivals else None, window, now, est)
    # the arrivals' variability at the TTFT budget's time scale, for the GI/G/c prefill wait (model.py)
    ca2 = 1.0
    if reqs is not None and p.max_arrival_scv > 1.0:
        tau = max(cfg.objectives.ttft_budget_s, 1.0)
        idc = arrival_scv(reqs[0], now - p.window_s, now, tau)
        if idc is not None:
            ca2 = min(max(idc, 1.0), p.max_arrival_scv)
    est = replace(est, arrival_scv=ca2)
    try:
        # decode also covers the recent short-bin peak rate: it has no queue to absorb a burst. Prefill's
        # queue absorbs a burst shorter than its TTFT budget only: one lasting a burst bin or longer
        # (bins >= the budget) must be served at its own rate. The busy-share cap applies to the load
        # observed: the forecast maximum carries its own margin for growth (model.py)
        peak_p = est.peak_rate_rps if p.burst_bin_s >= cfg.objectives.ttft_budget_s else 0.0
        target = model_target(cfg, max(fc.max_rps, peak_p), shape[0], shape[1], shape[2], shape[3],
                              calib.prefill_scale, calib.tpot_scale, decode_rate_rps=max(fc.max_rps, est.peak_rate_rps),
                              arrival_scv=ca2, utilization_rate_rps=max(est.arrival_rate_rps, 1e-9))
        shrink_p = target.n_prefill_exact if target.n_prefill_capped_exact is None else target.n_prefill_capped_exact
        if fleet.serving_prefill > 0 and fleet.serving_decode > 0 and est.arrival_rate_rps > 0:
            # the model's tail at the fleet as it serves now and the load as observed: beside the observed tail
            predicted_q = model_target(
                cfg, est.arrival_rate_rps, shape[0], shape[1], shape[2], shape[3], calib.prefill_scale,
                calib.tpot_scale, at=(fleet.serving_prefill, fleet.serving_decode), arrival_scv=ca2).predicted_ttft_s
        now_t = model_target(cfg, max(est.arrival_rate_rps, 1e-9), shape[0], shape[1], shape[2], shape[3],
                             calib.prefill_scale, calib.tpot_scale,
                             decode_rate_rps=max(est.arrival_rate_rps, est.peak_rate_rps), arrival_scv=ca2)
    except (InfeasibleError, ModelInputError) as e:
        decisions.append(Decision("fleet", Reason.INFEASIBLE, str(e)))
        return result([], new_state, None, cur_p, cur_d)
    # a transient shorter than the time to act cannot be served by acting: hold the observed need that
    # long at most (a flip's lead where flips move capacity fast, a cold start's otherwise)
    lead = p.flip_lead_s if p.mode is Mode.FIXED or p.flip_lead_s < p.cold_start_s else p.cold_start_s
    target, needs = _observed_decode_need(target, obs, state.observed_needs, now, min(p.observed_need_hold_s, lead))
    new_state = replace(new_state, observed_needs=needs)
    target = _with_headroom(target, feedback, decisions)
    backlog = decode_backlog = None
    if reqs is not None:
        obj = cfg.objectives
        priced = priced_requests(cfg.hardware.profile.prefill, *reqs, calib.prefill_scale)
        backlog = prefill_backlog_need(priced, obj.ttft_budget_s, obj.ttft_quantile)
        # the bound is exact for the fluid pool and the model's error is elsewhere: no headroom on it
        target = target.at_least(prefill=backlog)
        # the arrivals show their own fluctuation: the batch at the objective, without the Poisson margin
        b = target.decode_batch_max
        if b is not None and b > 0:
            # decode sees the bursts as fast as the prefill the plan serves with releases them
            c = float(max(target.n_prefill, fleet.serving_prefill, 1))
            decode_backlog = decode_arrivals_need(priced, obj.tpot_ms / 1000.0, c, b, 1.0 - p.miss_allowance)
            target = target.at_least(decode=decode_backlog)
        target = replace(target, prefill_backlog_need=backlog, decode_backlog_need=decode_backlog)
    backlogs = tuple(b for b in state.backlogs if b[0] >= now - p.regrow_hold_s)
    if backlog is not None:
        backlogs = (*backlogs, (now, backlog, decode_backlog or 0.0))
    new_state = replace(new_state, backlogs=backlogs)
    if thin is not None:
        decisions.append(Decision("fleet", Reason.INSUFFICIENT_DATA, thin))

    held_p = max(held_rate(rates, now, p.regrow_hold_s, use_peak=peak_p > 0), 1e-9)
    held_d = max(held_rate(rates, now, p.regrow_hold_s, use_peak=True), 1e-9)
    held = model_target(cfg, held_p, shape[0], shape[1], shape[2], shape[3], calib.prefill_scale,
                        calib.tpot_scale, decode_rate_rps=held_d, arrival_scv=ca2)
    ctx = Context(
        history=history, burn=burn, prefill_busy=obs.stats.prefill_busy_fraction,
        decode_batch=obs.stats.decode_running_mean,
        prefill_util_target=_prefill_util_target(cfg, target, samples, est, calib.prefill_scale),
        held_prefill_need=held.n_prefill_exact, held_decode_need=held.n_decode_exact,
        held_prefill_backlog=max((b[1] for b in backlogs), default=0.0),
        held_decode_backlog=max((b[2] for b in backlogs), default=0.0),
        now_prefill_need=max(now_t.n_prefill_exact * feedback.prefill_headroom, backlog or 0.0),
        now_decode_need=max(_decode_with_headroom(now_t.n_decode_exact, target.decode_observed_need,
                                                  feedback.decode_headroom), decode_backlog or 0.0),
        shrink_prefill_need=max(shrink_p * feedback.prefill_headroom, backlog or 0.0),
    )
    if p.mode is Mode.FIXED:
        return _tick_fixed(new_state, fleet, cfg, now, target, thin is not None, decisions, result, ctx)
    return _tick_elastic(new_state, fleet, cfg, now, target, thin is not None, decisions, result, ctx)


def _with_headroom(target: ModelTarget, fb: FeedbackState, decisions: list[Decision]) -> ModelTarget:
    """Scale each pool's need by its feedback headroom: above 1 while its observed tail burns, below 1
    while an error budget stays unspent (the decode need read from the running batch is observed,
    not modelled: it is never scaled down)."""
    hp, hd = fb.prefill_headroom, fb.decode_headroom
    if hp == 1.0 and hd == 1.0:
        return target
    if hp >= 1.01:
        decisions.append(Decision("prefill", Reason.SLO_BREACH, f"tail feedback: need x{hp:.2f}"))
    if hd >= 1.01:
        decisions.append(Decision("decode", Reason.SLO_BREACH, f"tail feedback: need x{hd:.2f}"))
    elif hd <= 0.99:
        decisions.append(Decision("decode", Reason.BUDGET_UNSPENT,
                                  f"TPOT budget unspent: model need x{hd:.2f} (observed needs whole)"))
    pe, de = target.n_prefill_exact * hp, _decode_with_headroom(target.n_decode_exact, target.decode_observed_need, hd)
    return replace(target, n_prefill_exact=pe, n_decode_exact=de,
                   n_prefill=max(1, math.ceil(pe - 1e-9)), n_decode=max(1, math.ceil(de - 1e-9)))


def _decode_with_headroom(need: float, observed_need: float | None, headroom: float) -> float:
    """Decode's need times its feedback headroom. Below 1 the headroom scales the model only: the need
    the running batch calls for is observed, and stays whole."""
    return max(need * headroom, (observed_need or 0.0) * max(headroom, 1.0))


def _window_requests(cfg: ControlSpec, arrivals: ArrivalWindow | None, window: EventWindow, now: float,
                     est: Estimates) -> tuple[FloatArray, FloatArray, FloatArray] | None:
    """The window's requests as (arrival time, uncached input tokens, output tokens), for the bounds
    read from the arrivals at every time scale (core/backlog.py), or None if too few.

    Read from the arrivals (the leading indicator: a burst shows as it arrives) when the tap reports
    them, each with the window's mean output length (not known at arrival); otherwise from the
    completed requests, which show the same burst one request lifetime later.
    """
    p = cfg.params
    t0 = now - p.window_s
    if arrivals is not None:
        t, inp, _, _ = arrivals.since(t0)
        uncached = inp * (1.0 - est.cache_hit_rate)
        out = np.full(t.shape, max(est.output_len_mean, 1.0))
    else:
        w = window.since(t0)
        t, uncached, out = w.arrival_s, w.input_tokens - w.cached_tokens, w.output_tokens
    if t.size < p.min_samples:
        return None
    return t, uncached, out


def _prefill_util_target(cfg: ControlSpec, target: ModelTarget, samples: tuple[float, ...], est: Estimates,
                         scale: float) -> float | None:
    """Busy share of one prefill instance at the model's per-instance rate (rate x mean service time)."""
    if not samples:
        return None
    svc = service_time(cfg.hardware.profile.prefill, samples, est.cache_hit_rate)
    return min(1.0, target.prefill_rate_per_instance_rps * svc.mean_s * scale)


def _observed_decode_need(
    target: ModelTarget, obs: Observations, hist: tuple[tuple[float, float], ...], now: float, hold_s: float,
) -> tuple[ModelTarget, tuple[tuple[float, float], ...]]:
    """Decode instances the *observed* running batch calls for (Little's law, measured).

    The length estimates come from completed requests, which lag a shift to
    longer outputs by one request lifetime (short requests complete first);
    the decode pool's running batch does not lag. Need = (running + queued,
    here and at the router's decode gate) / target batch, held for `hold_s`
    (the minimum over that window: a prefill backlog drained at once floods
    decode for a moment, which an instance still cold-starting cannot serve);
    the plan takes the larger of this and the model's need.
    """
    s = obs.stats
    b = target.decode_batch_target
    if s.decode_running_mean is None or b is None or b <= 0 or obs.fleet.serving_decode <= 0:
        return target, hist
    gate = getattr(s, "decode_gate_waiting", None) or 0
    running = s.decode_running_mean * obs.fleet.serving_decode + (s.decode_queued or 0) + gate
    hist = (*tuple(h for h in hist if h[0] > now - hold_s), (now, running / b))
    need = min(n for _, n in hist)
    return replace(target.at_least(decode=need), decode_observed_need=need), hist


def _pool_stages(
    role: Role, cur: int, exact: float, recs: stages.Recs, thin: bool, cfg: ControlSpec, now: float,
    decisions: list[Decision],
) -> tuple[int, stages.Recs]:
    p = cfg.params
    lo, hi = (p.min_prefill, p.max_prefill) if role is Role.PREFILL else (p.min_decode, p.max_decode)
    n, r = stages.tolerance_band(cur, exact, p.tolerance, p.tolerance_up)
    if r is not None:
        decisions.append(Decision(role.value, r, f"need {exact:.2f}, have {cur}"))
    if thin and n < cur:
        n = cur  # never scale down on thin or stale data
    recs = stages.record(recs, now, n, p.history_s, current=cur)
    n2, r = stages.stabilize(recs, now, cur, p.up_window_s, p.stabilization_down_s, p.stabilization_up_quantile)
    if r is not None:
        decisions.append(Decision(role.value, Reason.STABILIZING, f"recommendation {n}, holding {n2}"))
    n3, r = stages.bounds(n2, lo, hi)
    if r is not None:
        decisions.append(Decision(role.value, r, f"{n2} outside [{lo}, {hi}]"))
    return n3, recs


def _safe_down(role: Role, cur: int, want: int, target: ModelTarget, ctx: Context, fb: FeedbackState,
               decisions: list[Decision], hold: bool = True) -> int:
    """Stage after bounds: a shrink must hold the peak load of the regrow time and the observed load.

    `hold=False` (a flip to a pool that misses its objective now): a miss that is certain outweighs one
    that may come back, so only the load observed now must fit.
    """
    if want >= cur:
        return want
    if role is Role.PREFILL:
        floor = max(safe_down_floor(ctx.held_prefill_need, fb.prefill_headroom),
                    math.ceil(ctx.held_prefill_backlog - 1e-9),
                    math.ceil(ctx.shrink_prefill_need - 1e-9)) if hold else 1
        util, util_target = ctx.prefill_busy, ctx.prefill_util_target
    else:
        floor = max(safe_down_floor(ctx.held_decode_need, fb.decode_headroom),
                    math.ceil(ctx.held_decode_backlog - 1e-9)) if hold else 1
        util, util_target = ctx.decode_batch, target.decode_batch_target
    n = min(cur, max(want, floor))
    if n < cur and not consolidation_ok(util, cur, n, util_target):
        n = cur
        decisions.append(Decision(role.value, Reason.SCALE_DOWN_RISK,
                                  f"observed load at {cur} would not fit {want}"))
    elif n > want:
        decisions.append(Decision(role.value, Reason.SCALE_DOWN_RISK,
                                  f"peak of the regrow window needs {floor}; holding {n} (wanted {want})"))
    if _gives_while_breaching(role, cur, target, ctx):
        n = cur  # never give up capacity while the pool's own objective is missed
    return n


def _gives_while_breaching(role: Role, cur: int, target: ModelTarget, ctx: Context) -> bool:
    """The pool misses its own objective and its observed load needs every instance it has.

    A pool whose observed load would fit one instance fewer is not missing for want of capacity: a
    prefill pool idling while requests wait for decode memory shows TTFT misses that its size cannot
    mend, and holding it whole would keep the short pool short (in a fixed budget, for good).
    """
    if not breaching(ctx.burn, role is Role.PREFILL):
        return False
    if role is Role.PREFILL:
        util, util_target = ctx.prefill_busy, ctx.prefill_util_target
    else:
        util, util_target = ctx.decode_batch, target.decode_batch_target
    if util is None or util_target is None or cur <= 1:
        return True
    return not consolidation_ok(util, cur, cur - 1, util_target)


def _reversal_blocked(role: Role, ctx: Context, now: float, cfg: ControlSpec) -> bool:
    """A flip toward `role` undoes the last observed flip within the stabilization window,
    and the pool it would refill keeps its objective: not worth two drains."""
    h = ctx.history
    direction = 1 if role is Role.PREFILL else -1
    recent = now - h.last_flip_s < cfg.params.stabilization_down_s
    return recent and direction == -h.last_flip_dir and not breaching(ctx.burn, role is Role.PREFILL)


def _tick_elastic(
    st: ControllerState, fleet: FleetView, cfg: ControlSpec, now: float, target: ModelTarget, thin: bool,
    decisions: list[Decision], result: ResultFn, ctx: Context,
) -> TickResult:
    p = cfg.params
    cur_p, cur_d = fleet.committed(Role.PREFILL), fleet.committed(Role.DECODE)
    want_p, recs_p = _pool_stages(Role.PREFILL, cur_p, target.n_prefill_exact, st.recs_prefill, thin, cfg, now, decisions)
    want_d, recs_d = _pool_stages(Role.DECODE, cur_d, target.n_decode_exact, st.recs_decode, thin, cfg, now, decisions)
    want_p = _safe_down(Role.PREFILL, cur_p, want_p, target, ctx, st.feedback, decisions)
    want_d = _safe_down(Role.DECODE, cur_d, want_d, target, ctx, st.feedback, decisions)
    if now - st.start_s < p.regrow_hold_s and (want_p < cur_p or want_d < cur_d):
        # the peak held over the regrow time is partial until the controller has seen that long: a
        # pool given up now on a load still rising (a ramp read as flat by a young forecast) comes back
        # a cold start later. A flip, which serves where the load is now, stays allowed.
        decisions.append(Decision("fleet", Reason.SCALE_DOWN_RISK,
                                  f"{now - st.start_s:.0f}s observed, less than the regrow window of "
                                  f"{p.regrow_hold_s:.0f}s: no scale-down on partial data"))
        want_p, want_d = max(want_p, cur_p), max(want_d, cur_d)
    st = replace(st, recs_prefill=recs_p, recs_decode=recs_d)
    # instantaneous need (no stabilization): what a pool could give up right now
    need_p = stages.bounds(target.n_prefill, p.min_prefill, p.max_prefill)[0]
    need_d = stages.bounds(target.n_decode, p.min_decode, p.max_decode)[0]
    dp, dd = want_p - cur_p, want_d - cur_d
    actions: list[Action] = []
    h = ctx.history
    flips_ok = stages.flips_allowed(fleet.flips_in_flight, h.flip_times, now, p.max_flips_in_flight, p.max_flips_per_hour)
    flip_faster = p.flip_lead_s < p.cold_start_s
    # a flip is the faster action: its need must persist a tenth of *its* lead, not of a cold start's
    flip_up_s = max(p.stabilization_up_s, 0.1 * p.flip_lead_s)
    fdp, fdd = dp, dd
    if flip_faster:
        fp = stages.bounds(stages.stabilize(recs_p, now, cur_p, flip_up_s, p.stabilization_down_s,
                                            p.stabilization_up_quantile)[0],
                           p.min_prefill, p.max_prefill)[0]
        fd = stages.bounds(stages.stabilize(recs_d, now, cur_d, flip_up_s, p.stabilization_down_s,
                                            p.stabilization_up_quantile)[0],
                           p.min_decode, p.max_decode)[0]
        fdp, fdd = max(dp, fp - cur_p), max(dd, fd - cur_d)
    for role, short, other_cur, other_need, other_serving, other_now in (
        (Role.PREFILL, fdp, cur_d, need_d, fleet.serving_decode, ctx.now_decode_need),
        (Role.DECODE, fdd, cur_p, need_p, fleet.serving_prefill, ctx.now_prefill_need),
    ):
        # a flip takes a serving instance, and leaves the other pool at or above its need; the giving
        # pool shrinks, so it passes the same safety stage as a scale-down (peak hold, observed load)
        donor = Role.DECODE if role is Role.PREFILL else Role.PREFILL
        keep = _safe_down(donor, other_cur, other_need, target, ctx, st.feedback, decisions,
                          hold=not breaching(ctx.burn, role is Role.PREFILL)) if short > 0 else other_cur
        # (with the tolerance band as margin: a donor left exactly at the load's need runs at its edge)
        surplus = min(other_cur - keep, other_serving - max(1, math.ceil(other_now * (1.0 + p.tolerance) - 1e-9)))
        if short > 0 and surplus > 0 and flip_faster and not thin:
            n = min(short, surplus)
            if _reversal_blocked(role, ctx, now, cfg):
                decisions.append(Decision(role.value, Reason.REVERSAL_BLOCKED,
                                          f"last flip went the other way {now - h.last_flip_s:.0f}s ago"))
                n = 0
            if flips_ok < n:
                decisions.append(Decision(role.value, Reason.RATE_LIMITED, f"{n} flips wanted, {flips_ok} allowed"))
                n = flips_ok
            if n > 0:
                kind = ActionKind.FLIP_TO_PREFILL if role is Role.PREFILL else ActionKind.FLIP_TO_DECODE
                reason = Reason.SLO_PREFILL_SHORT if role is Role.PREFILL else Reason.SLO_DECODE_SHORT
                actions.append(Action(kind, n, reason))
                decisions.append(Decision(role.value, reason, f"flip {n}: other pool has {surplus} spare"))
                flips_ok -= n
                # the giving pool is left at or above its need: it does not scale back up for the flip
                # (a flip may run ahead of the scale-up's slower stabilization: never below zero)
                if role is Role.PREFILL:
                    dp = max(dp - n, 0)
                    dd = min(dd + n, 0)
                else:
                    dd = max(dd - n, 0)
                    dp = min(dp + n, 0)
    # GPU cap on growth (elastic with a budget)
    budget = cfg.budget_instances()
    if budget is not None:
        room = budget - fleet.allocated
        for _ in range(2):
            if dp > 0 and dp + max(dd, 0) > room:
                take = max(0, min(dp, room - max(dd, 0)))
                if take < dp:
                    decisions.append(Decision("prefill", Reason.AT_BOUND, f"GPU budget {p.gpus}"))
                dp = take
            if dd > 0 and dd + max(dp, 0) > room:
                take = max(0, min(dd, room - max(dp, 0)))
                if take < dd:
                    decisions.append(Decision("decode", Reason.AT_BOUND, f"GPU budget {p.gpus}"))
                dd = take
    for role, delta in ((Role.PREFILL, dp), (Role.DECODE, dd)):
        if delta == 0:
            continue
        step = max(-p.max_scale_step, min(p.max_scale_step, delta))
        if step != delta:
            decisions.append(Decision(role.value, Reason.RATE_LIMITED, f"scale {delta} limited to {step}"))
        kind = ActionKind.SCALE_PREFILL if role is Role.PREFILL else ActionKind.SCALE_DECODE
        if step > 0:
            reason = Reason.SLO_PREFILL_SHORT if role is Role.PREFILL else Reason.SLO_DECODE_SHORT
        else:
            reason = Reason.PREFILL_SURPLUS if role is Role.PREFILL else Reason.DECODE_SURPLUS
        actions.append(Action(kind, step, reason))
        decisions.append(Decision(role.value, reason, f"scale {step:+d}"))
    # the desired fleet once these actions land (history records them only when observed to start)
    sp = sum(a.count for a in actions if a.kind is ActionKind.SCALE_PREFILL)
    sd = sum(a.count for a in actions if a.kind is ActionKind.SCALE_DECODE)
    fp = sum(a.count for a in actions if a.kind is ActionKind.FLIP_TO_PREFILL)
    fd = sum(a.count for a in actions if a.kind is ActionKind.FLIP_TO_DECODE)
    return result(actions, st, target, cur_p + sp + fp - fd, cur_d + sd + fd - fp)


def _cover(pn: int, dn: int, pe: float, de: float) -> float:
    return min(pn / pe if pe > 0 else math.inf, dn / de if de > 0 else math.inf)


def _tick_fixed(
    st: ControllerState, fleet: FleetView, cfg: ControlSpec, now: float, target: ModelTarget, thin: bool,
    decisions: list[Decision], result: ResultFn, ctx: Context,
) -> TickResult:
    p = cfg.params
    h = ctx.history
    cur_p, cur_d = fleet.committed(Role.PREFILL), fleet.committed(Role.DECODE)
    total = cur_p + cur_d
    # every move in a fixed budget shrinks one pool, so prefill's need is the stricter (shrink) view
    pe, de = max(target.n_prefill_exact, ctx.shrink_prefill_need), target.n_decode_exact
    best = stages.best_split(pe, de, total, p.min_prefill, p.max_prefill, p.min_decode, p.max_decode, cur_p)
    cover_cur, cover_best = _cover(cur_p, cur_d, pe, de), _cover(best, total - best, pe, de)
    want = best
    if thin:
        decisions.append(Decision("fleet", Reason.INSUFFICIENT_DATA, "no flips on thin data"))
        want = cur_p
    elif best != cur_p and (cover_cur >= 1.0 or cover_cur >= cover_best * (1.0 - p.tolerance)):
        decisions.append(Decision("fleet", Reason.WITHIN_TOLERANCE,
                                  f"cover {cover_cur:.2f} vs best {cover_best:.2f} at {best}P{total - best}D"))
        want = cur_p
    elif best != cur_p and _gives_while_breaching(Role.PREFILL if best < cur_p else Role.DECODE,
                                                  cur_p if best < cur_p else cur_d, target, ctx):
        # the pool that would give an instance up misses its own objective now
        decisions.append(Decision("fleet", Reason.SLO_BREACH, "the giving pool misses its objective"))
        want = cur_p
    recs = stages.record(st.recs_split, now, want, p.history_s, current=cur_p)
    direction = (want > cur_p) - (want < cur_p)
    reversing = direction != 0 and direction == -h.last_flip_dir and now - h.last_flip_s < p.stabilization_down_s
    toward = Role.PREFILL if direction > 0 else Role.DECODE
    if reversing and not breaching(ctx.burn, toward is Role.PREFILL):
        # undoing a recent flip while the pool it would refill keeps its objective: not worth two drains
        decisions.append(Decision("fleet", Reason.REVERSAL_BLOCKED,
                                  f"last flip went the other way {now - h.last_flip_s:.0f}s ago"))
        st = replace(st, recs_split=recs)
        return result([], st, target, cur_p, total - cur_p)
    n, r = stages.stabilize(recs, now, cur_p, p.up_window_s, p.up_window_s)
    if r is not None and want != cur_p:
        decisions.append(Decision("fleet", Reason.STABILIZING, f"recommendation {want}P, holding {n}P"))
    n, r = stages.bounds(n, max(p.min_prefill, total - p.max_decode), min(p.max_prefill, total - max(1, p.min_decode)))
    if r is not None:
        decisions.append(Decision("fleet", r, f"split bound {n}P"))
    st = replace(st, recs_split=recs)
    delta = n - cur_p
    actions: list[Action] = []
    if delta != 0:
        ok = stages.flips_allowed(fleet.flips_in_flight, h.flip_times, now, p.max_flips_in_flight, p.max_flips_per_hour)
        k = min(abs(delta), ok)
        if k < abs(delta):
            decisions.append(Decision("fleet", Reason.RATE_LIMITED, f"{abs(delta)} flips wanted, {ok} allowed"))
        if k > 0:
            if delta > 0:
                reason = Reason.SLO_PREFILL_SHORT if cur_p < pe else Reason.REBALANCE
                actions.append(Action(ActionKind.FLIP_TO_PREFILL, k, reason))
            else:
                reason = Reason.SLO_DECODE_SHORT if cur_d < de else Reason.REBALANCE
                actions.append(Action(ActionKind.FLIP_TO_DECODE, k, reason))
            decisions.append(Decision("fleet", reason, f"flip {k} toward {n}P{total - n}D"))
            n = cur_p + (k if delta > 0 else -k)
        else:
            n = cur_p
    return result(actions, st, target, n, total - n)
