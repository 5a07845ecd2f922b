"""`pd-controller demo`: the whole system on one machine, no GPU, no cluster, a few minutes.

What runs (all on 127.0.0.1, all stopped at the end, Ctrl-C included):

    replayed trace -> pd-router-tap -> smg (PD mode, from PyPI; --router) -> 4 emulated SGLang workers
                          | events (ZeroMQ)                                    ^ restarted in the other role
                          v                                                    | by their node agents (CURVE)
                    the controller (sidecar: estimators -> model -> policy -> drained flips through the router)

The trace is real: Azure LLM inference 2023, code traffic (long prompts, short
answers: prefill-heavy) then conversation traffic (shorter prompts, long
answers: decode-heavy), time-compressed. The fleet is a fixed budget of four
instances, so the controller can only move capacity by flipping workers
between the pools; the right split moves from about 3P1D to 1P3D midway.

Time scaling: the emulated workers run the measured Llama-2-70B/H100 profile
with every duration multiplied by `--time-scale` (default 2: half speed, so a
laptop's CPU can carry the token streams); the controller is given the same
profile and SLOs scaled by the same factor, so its model and the fleet agree.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import yaml

from controller.core.errors import PdControllerError

REPO = Path(__file__).resolve().parents[1]
PROFILE = "llama2-70b-h100-tp8"
# Target load in GPU time (requests/s on the real profiled hardware), chosen in the simulator with the demo's own
# schedule, profile, objectives and control parameters (`python bench/demo_sim.py`) so that four instances meet the
# objectives in each phase with the right split and cannot with the wrong one: the code phase (long prompts, short
# answers) needs 3P1D (~98% simulated; static 2P2D ~85%, 1P3D ~18%), the conversation phase (shorter prompts,
# ~250-token answers) needs 2P2D or more decode (static 3P1D: ~12%). Above ~6.8 req/s the code stretch takes in a
# burst that even 3P1D serves at only ~90%. The fleet starts at 3P1D, the split an operator who benchmarked the code
# traffic would keep; the controller must follow the shift. Wall-clock rates are these / --time-scale.
CODE_RPS = 6.6
CONV_RPS = 4.5
# where each phase starts in its trace: the code trace's first 18 minutes have long gaps, the conversation
# trace's first minutes ramp up; start where each is steadier
CODE_OFFSET_S = 1080.0
CONV_OFFSET_S = 600.0
TTFT_S = 2.0  # per-request objective, judged at the 90th percentile by the controller's model
TTFT_QUANTILE = 0.9
TPOT_MS = 40.0
INITIAL = "3P1D"
# two phases of 65 s: the whole run (start, replay, the last long answers, stop) fits in three minutes
DURATION_S = 130.0
VOCAB = (100, 32000)


class DemoError(PdControllerError):
    """The demo could not start a component; the message says which."""


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="run the whole system on this machine: real router, emulated workers, agents, tap, controller",
        description="Start the real PD router (smg by default, from PyPI) over four emulated workers managed by node agents, the "
        "tap and the controller; replay Azure code traffic then conversation traffic; show the controller flipping "
        "workers as the P:D need shifts; print a summary and write a PNG plot. Needs no GPU.",
    )
    p.add_argument("--duration-s", type=float, default=DURATION_S, help="trace replay time (two phases, half each)")
    p.add_argument("--json", action="store_true", help="print only a JSON summary on stdout (live view to stderr)")
    p.add_argument("--time-scale", type=float, default=2.0,
                   help="emulated GPU durations x this (1 = real Llama-2-70B/H100 speed; 2 = half speed)")
    p.add_argument("--plot", type=Path, default=Path("pd-demo.png"), help="PNG plot path (default pd-demo.png)")
    p.add_argument("--workdir", type=Path, default=None, help="keep keys, configs and logs here (default: temp)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--router", default=None,
                   help="the PD router: smg (default, or $PD_ROUTER), sglang-router (0.3.x), or a command template "
                   "with {args} where the PD flags go")
    p.add_argument("--advisory", action="store_true",
                   help="baseline only: the controller decides and reports but never acts (the fleet stays static)")
    p.add_argument("--compare", action="store_true",
                   help="also run the same schedule with the controller advisory (a static fleet) and show both")
    p.add_argument("--initial", default=INITIAL, metavar="mPnD",
                   help=f"the split the four workers start in (default {INITIAL}, the code phase's right split)")


# ---- the trace ---------------------------------------------------------------------------------------------


def data_dir() -> Path:
    for cand in (REPO / "data", REPO.parent / "shared" / "data"):
        if (cand / "traces" / "azure-llm-2023").is_dir():
            return cand
    raise DemoError(f"no Azure traces under {REPO / 'data'} or ../shared/data")


@dataclass(frozen=True)
class Req:
    at_s: float
    phase: str
    input_tokens: int
    output_tokens: int


def initial_split(text: str) -> tuple[int, int]:
    """'3P1D' -> (3, 1): four workers, at least one per pool."""
    import re

    m = re.fullmatch(r"\s*(\d+)\s*[Pp]\s*(\d+)\s*[Dd]\s*", str(text))
    if m is None or int(m[1]) < 1 or int(m[2]) < 1 or int(m[1]) + int(m[2]) != 4:
        raise DemoError(f"--initial={text!r}: expected a split of the four workers such as 3P1D or 2P2D")
    return int(m[1]), int(m[2])


def build_schedule(duration_s: float, time_scale: float) -> list[Req]:
    """Code phase then conversation phase: consecutive requests of the real trace, from a steady stretch of it,
    with their real spacing uniformly compressed so each phase has its target mean rate."""
    from controller.sim.traces import load_trace

    half = duration_s / 2
    out: list[Req] = []
    for i, (name, rps, offset_s) in enumerate((("code", CODE_RPS, CODE_OFFSET_S), ("conv", CONV_RPS, CONV_OFFSET_S))):
        tr = load_trace(data_dir() / "traces" / "azure-llm-2023" / f"AzureLLMInferenceTrace_{name}.csv")
        n = max(2, round(rps / time_scale * half))
        start = int(np.searchsorted(tr.arrival_s, offset_s))
        a = tr.arrival_s[start : start + n]
        if a.size < 2:
            raise DemoError(f"the {name} trace has fewer than 2 requests after {offset_s:g}s")
        span = float(a[-1] - a[0]) * (a.size / (a.size - 1))  # one mean gap past the last arrival
        scale = half / span if span > 0 else 0.0
        for k in range(a.size):
            j = start + k
            out.append(Req(float(a[k] - a[0]) * scale + i * half, name,
                           int(max(1, min(tr.input_tokens[j], 16000))), int(max(1, min(tr.output_tokens[j], 2000)))))
    return out


# ---- configs -----------------------------------------------------------------------------------------------


def scaled_profile(src: Path, factor: float, dst: Path) -> Path:
    """The profile as the emulated workers run it: every duration x factor."""
    raw = yaml.safe_load(src.read_text())
    raw["name"] = f"{raw['name']}-x{factor:g}"
    raw["prefill"]["time_ms"] = [t * factor for t in raw["prefill"]["time_ms"]]
    raw["decode"]["tpot_ms"] = [[t * factor for t in row] for row in raw["decode"]["tpot_ms"]]
    raw["overhead_s"] = raw.get("overhead_s", 0.0) * factor
    kv = raw.get("kv_transfer")
    if isinstance(kv, dict):
        raw["kv_transfer"] = {k: v * factor for k, v in kv.items()}
    dst.write_text(yaml.safe_dump(raw, sort_keys=False))
    return dst


def controller_config(profile: Path, fleet: Any, tap_pub: str, s: float, journal: Path) -> dict[str, Any]:
    return {
        "slo": {"ttft_s": TTFT_S * s, "ttft_quantile": TTFT_QUANTILE, "tpot_ms": TPOT_MS * s},
        "hardware": {"profile": str(profile)},
        "control": {
            "mode": "fixed", "gpus": 32, "tick_period_s": 1.0, "window_s": 20.0, "min_samples": 10,
            "max_age_s": 30.0, "tolerance": 0.1, "stabilization_up_s": 3.0, "stabilization_down_s": 6.0,
            "max_flips_in_flight": 1, "max_flips_per_hour": 120, "flip_time_s": 4.0, "drain_s": 3.0,
            "cold_start_s": 10.0, "level_tau_s": 4.0, "trend_tau_s": 30.0, "trend_damping_s": 10.0,
            "burst_bin_s": 2.0, "calibrate": False,
        },
        "telemetry": {
            "zmq_endpoints": [tap_pub], "router_url": fleet.router_url, "router_metrics_url": fleet.router_metrics_url,
            "scrape_interval_s": 1.0, "workers_interval_s": 1.0, "fresh_s": 30.0,
        },
        "api": {"host": "127.0.0.1", "port": 0},
        "actuation": {
            # SGLang's in-place /pd_role_switch (the emulated workers run with --enable-pd-role-switch): a flip
            # is a drain plus a few seconds, not a server restart; the agents stay as the repair path
            "kind": "router", "router_url": fleet.router_url, "switch": "role-switch", "agents": fleet.endpoints,
            "agent_client_key": str(fleet.client_sec), "agent_server_key": str(fleet.server_pub),
            "bootstrap_ports": fleet.bootstrap,
            "drain_timeout_s": 90.0, "switch_timeout_s": 90.0, "register_timeout_s": 30.0, "verify_timeout_s": 10.0,
            "poll_interval_s": 0.2, "http_timeout_s": 5.0, "journal": str(journal),
        },
    }


# ---- the client --------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    sent_s: float
    phase: str
    ok: bool
    ttft_s: float = math.nan
    tpot_s: float = math.nan
    error: str = ""


@dataclass
class Client:
    url: str
    ttft_slo_s: float
    tpot_slo_s: float
    seed: int = 0
    model: str = "emulated"  # the served model name (smg routes by it)
    outcomes: list[Outcome] = field(default_factory=list)
    in_flight: int = 0
    sent: list[float] = field(default_factory=list)  # send times (s from t0): the offered load

    def met(self, o: Outcome) -> bool:
        return o.ok and o.ttft_s <= self.ttft_slo_s and (math.isnan(o.tpot_s) or o.tpot_s <= self.tpot_slo_s)

    async def one(self, session: Any, r: Req, t0: float) -> None:
        import aiohttp

        rng = random.Random(hash((self.seed, r.at_s)))
        body = {"model": self.model, "input_ids": [rng.randrange(*VOCAB) for _ in range(r.input_tokens)],
                "sampling_params": {"max_new_tokens": r.output_tokens, "ignore_eos": True}, "stream": True}
        sent = time.monotonic()
        self.sent.append(sent - t0)
        o = Outcome(sent - t0, r.phase, ok=False)
        self.in_flight += 1
        try:
            async with session.post(f"{self.url}/generate", json=body) as resp:
                if resp.status != 200:
                    o.error = f"HTTP {resp.status}: {(await resp.text())[:120]}"
                    return
                first = last = None
                chunks = 0
                async for line in resp.content:
                    if not line.startswith(b"data:") or line.strip() == b"data: [DONE]":
                        continue
                    now = time.monotonic()
                    if b'"error"' in line:
                        o.error = line[:160].decode(errors="replace")
                        return
                    first = first if first is not None else now
                    last = now
                    chunks += 1
                if first is None or last is None:
                    o.error = "no tokens streamed"
                    return
                o.ok = True
                o.ttft_s = first - sent
                o.tpot_s = (last - first) / (r.output_tokens - 1) if r.output_tokens > 1 else math.nan
        except (TimeoutError, aiohttp.ClientError) as e:
            o.error = f"{type(e).__name__}: {e}"[:160]
        finally:
            self.in_flight -= 1
            self.outcomes.append(o)

    async def replay(self, schedule: list[Req], t0: float, stop: asyncio.Event) -> None:
        import aiohttp

        conn = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=600)) as session:
            tasks: set[asyncio.Task[None]] = set()
            for r in schedule:
                delay = t0 + r.at_s - time.monotonic()
                if delay > 0:
                    # a plain sleep: Python 3.11's wait_for can swallow a cancellation that lands as its
                    # timeout fires, and Ctrl-C (the runner cancels this task) then went unheard
                    await asyncio.sleep(delay)
                if stop.is_set():
                    break
                t = asyncio.create_task(self.one(session, r, t0))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
            # let the requests in flight finish (a stream of 2000 tokens is the longest)
            if tasks:
                await asyncio.wait(tasks, timeout=120)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


# ---- recording actuator: what the demo shows and plots -------------------------------------------------------


class RecordingActuator:
    """Passes everything to the real actuator and keeps a timestamped list of what it did."""

    def __init__(self, inner: Any, t0: float) -> None:
        self.inner = inner
        self.name = inner.name
        self.t0 = t0
        self.done: list[tuple[float, Any, Any]] = []  # (t_s, ActionResult, role or pool)
        self.timings: dict[int, dict[str, float]] = {}  # id(ActionResult) -> seconds per flip phase
        self._steps: dict[str, list[tuple[str, float]]] = {}
        flipper = getattr(inner, "flipper", None)
        if flipper is not None and getattr(flipper, "on_step", None) is None:
            flipper.on_step = self._on_step  # the flipper's step hook: when each journaled step began

    async def _on_step(self, rec: Any) -> None:
        self._steps.setdefault(rec.worker, []).append((rec.step.value, time.monotonic() - self.t0))

    async def fleet(self) -> Any:
        return await self.inner.fleet()

    async def flip(self, worker: str, to_role: Any, reason: str) -> Any:
        submitted = time.monotonic() - self.t0
        self._steps[worker] = []
        r = await self.inner.flip(worker, to_role, reason)
        done = time.monotonic() - self.t0
        self.done.append((done, r, to_role))
        at = dict(self._steps.pop(worker, []))
        t: dict[str, float] = {"submitted_s": round(submitted, 2), "total_s": round(done - submitted, 2)}
        if "drain" in at and "switch" in at:
            t["drain_s"] = round(at["switch"] - at["drain"], 2)  # no new work until the last stream ended
        if "switch" in at and "register" in at:
            t["switch_s"] = round(at["register"] - at["switch"], 2)  # /pd_role_switch until healthy
        self.timings[id(r)] = t
        return r

    async def scale(self, pool: Any, delta: int, reason: str) -> Any:
        r = await self.inner.scale(pool, delta, reason)
        self.done.append((time.monotonic() - self.t0, r, pool))
        return r

    async def close(self) -> None:
        await self.inner.close()


# ---- processes ---------------------------------------------------------------------------------------------


def start_tap(router_url: str, work: Path) -> tuple[subprocess.Popen[bytes], str, str]:
    from harness.fleet import free_port

    port, zport = free_port(), free_port()
    pub = f"tcp://127.0.0.1:{zport}"
    with open(work / "tap.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "router_plugin.tap", "--listen", f"127.0.0.1:{port}", "--router", router_url,
             "--publish", pub],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DemoError(f"pd-router-tap exited with {proc.returncode}: see {work / 'tap.log'}")
        with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/tap/healthz", timeout=1):
            return proc, url, pub
        time.sleep(0.2)
    raise DemoError("pd-router-tap did not come up in 30 s")


# ---- live view ---------------------------------------------------------------------------------------------


@dataclass
class Sample:
    t: float
    rate_rps: float
    prefill: int
    decode: int
    attainment: float


def rolling(client: Client, now: float, window_s: float = 20.0) -> float:
    recent = [o for o in client.outcomes[-2000:] if o.sent_s >= now - window_s]
    return sum(client.met(o) for o in recent) / len(recent) if recent else math.nan


def view_line(t: float, phase: str, rate: float, p: int, d: int, target: str, att: float, c: Client) -> str:
    failed = sum(1 for o in c.outcomes if not o.ok)
    att_s = f"{att * 100:5.1f}%" if not math.isnan(att) else "   - "
    return (f"t={t:5.0f}s  {phase:<4}  load {rate:5.1f} req/s  fleet {p}P{d}D  target {target:<5}  "
            f"SLO(20s) {att_s}  done {len(c.outcomes):5d}  failed {failed}  in flight {c.in_flight}")


async def live_view(sidecar: Any, act: RecordingActuator, client: Client, t0: float, half_s: float,
                    samples: list[Sample], stop: asyncio.Event, out: TextIO) -> None:
    last_tick = 0
    seen_actions = 0
    last_print = 0.0
    while not stop.is_set():
        await asyncio.sleep(1.0)
        now = time.monotonic() - t0
        # offered load: requests sent in the last 10 s
        rate = sum(1 for x in client.sent[-5000:] if x >= now - 10.0) / 10.0
        fleet = sidecar.current_fleet()
        p, d = (fleet.serving_prefill, fleet.serving_decode) if fleet is not None else (0, 0)
        diag = sidecar.loop.last_diagnostics
        target = f"{diag.desired_prefill}P{diag.desired_decode}D" if diag and diag.desired_prefill is not None else "-"
        att = rolling(client, now)
        samples.append(Sample(now, rate, p, d, att))
        for rec in list(sidecar.loop.history):
            if rec.tick > last_tick and rec.actions:
                print(f"           decision  tick {rec.tick}: {rec.reason} -> {', '.join(rec.actions)} "
                      f"[{rec.applied}]  {rec.detail[:80]}", file=out, flush=True)
        if sidecar.loop.history:
            last_tick = max(last_tick, sidecar.loop.history[-1].tick)
        for when, r, _ in act.done[seen_actions:]:
            verb = "flip" if r.op == "flip" else "scale"
            print(f"           actuator  {verb} {r.target} at t={when:.0f}s: {'ok' if r.ok else 'FAILED'} "
                  f"({r.reason}) {r.detail[:100]}", file=out, flush=True)
        seen_actions = len(act.done)
        if now - last_print >= 2.0:
            last_print = now
            phase = "code" if now < half_s else "conv"
            print(view_line(now, phase, rate, p, d, target, att, client), file=out, flush=True)


# ---- summary and plot --------------------------------------------------------------------------------------


def summarize(client: Client, act: RecordingActuator, samples: list[Sample], fleet_end: tuple[int, int],
              half_s: float, args: argparse.Namespace, plot_path: Path | None) -> dict[str, Any]:
    outs = client.outcomes
    ok = [o for o in outs if o.ok]
    met = [o for o in outs if client.met(o)]
    flips = [r for _, r, _ in act.done if r.op == "flip"]

    def phase_stats(name: str) -> dict[str, Any]:
        ph = [o for o in outs if o.phase == name]
        tail = [o for o in ph if (o.sent_s >= half_s / 2 if name == "code" else o.sent_s >= half_s * 1.5)]
        return {
            "requests": len(ph),
            "failed": sum(1 for o in ph if not o.ok),
            "slo_attainment": round(sum(client.met(o) for o in ph) / len(ph), 4) if ph else None,
            "slo_attainment_second_half": round(sum(client.met(o) for o in tail) / len(tail), 4) if tail else None,
            "ttft_p50_s": _q([o.ttft_s for o in ph if o.ok], 0.5), "tpot_p50_s": _q([o.tpot_s for o in ph if o.ok], 0.5),
            "ttft_p90_s": _q([o.ttft_s for o in ph if o.ok], 0.9), "tpot_p90_s": _q([o.tpot_s for o in ph if o.ok], 0.9),
        }

    splits = {}
    for name, lo, hi in (("code", 0.0, half_s), ("conv", half_s, 2 * half_s)):
        last = [s for s in samples if lo <= s.t < hi]
        if last:
            splits[name] = f"{last[-1].prefill}P{last[-1].decode}D"
    return {
        "requests": len(outs),
        "completed_requests": len(ok),
        "failed_requests": len(outs) - len(ok),
        "slo_attainment": round(len(met) / len(outs), 4) if outs else None,
        "slo": {"ttft_s": TTFT_S * args.time_scale, "tpot_s": TPOT_MS * args.time_scale / 1000,
                "note": "scaled by --time-scale like the emulated GPUs"},
        "flips": sum(1 for r in flips if r.ok),
        "flip_failures": sum(1 for r in flips if not r.ok),
        "flip_log": [{"t_s": round(t, 1), "worker": r.target, "to": str(role), "ok": r.ok, "reason": r.reason,
                      "detail": r.detail, **act.timings.get(id(r), {})} for t, r, role in act.done],
        "reaction_s": reaction(act, half_s),
        "final_prefill": fleet_end[0],
        "final_decode": fleet_end[1],
        "split_at_end_of_phase": splits,
        "phases": {"code": phase_stats("code"), "conv": phase_stats("conv")},
        "duration_s": args.duration_s,
        "advisory": bool(args.advisory),
        "time_scale": args.time_scale,
        "errors": sorted({o.error for o in outs if not o.ok})[:5],
        "plot": str(plot_path) if plot_path else None,
        "trace": "Azure LLM inference 2023 (code, then conversation), data/traces/azure-llm-2023, CC-BY-4.0",
    }


def reaction(act: RecordingActuator, half_s: float) -> dict[str, float | None]:
    """Seconds from each phase's start to the first flip that completed after it (drain and switch included),
    and (`{phase}_submitted`) to the submission of that flip."""
    out: dict[str, float | None] = {}
    for name, lo, hi in (("code", 0.0, half_s), ("conv", half_s, 2 * half_s)):
        done = [(t, r) for t, r, _ in act.done if r.op == "flip" and r.ok and lo <= t < hi]
        first = min(done, key=lambda x: x[0]) if done else None
        out[name] = round(first[0] - lo, 1) if first else None
        sub = act.timings.get(id(first[1]), {}).get("submitted_s") if first else None
        out[f"{name}_submitted"] = round(sub - lo, 1) if sub is not None else None
    return out


def _q(xs: list[float], q: float) -> float | None:
    xs = [x for x in xs if not math.isnan(x)]
    return round(float(np.quantile(xs, q)), 4) if xs else None


def plot(samples: list[Sample], act: RecordingActuator, half_s: float, out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = np.array([s.t for s in samples])
    fig, ax = plt.subplots(3, 1, figsize=(10, 8), sharex=True)
    ax[0].plot(t, [s.rate_rps for s in samples], color="black", lw=1)
    ax[0].set_ylabel("load (req/s, 10 s)")
    ax[1].step(t, [s.prefill for s in samples], where="post", label="prefill", lw=1.5)
    ax[1].step(t, [s.decode for s in samples], where="post", label="decode", lw=1.5)
    for when, r, _ in act.done:
        ax[1].axvline(when, color="green" if r.ok else "red", ls="--", lw=0.8)
    ax[1].set_ylabel("serving instances")
    ax[1].legend(loc="upper right")
    ax[2].plot(t, [s.attainment * 100 for s in samples], color="tab:purple", lw=1.2)
    ax[2].set_ylabel("SLO attainment % (20 s)")
    ax[2].set_ylim(0, 105)
    ax[2].set_xlabel("time (s)")
    for a in ax:
        a.axvspan(0, half_s, color="tab:blue", alpha=0.05)
        a.axvspan(half_s, 2 * half_s, color="tab:orange", alpha=0.05)
    ax[0].text(half_s * 0.02, ax[0].get_ylim()[1] * 0.9, "code traffic", fontsize=8)
    ax[0].text(half_s * 1.02, ax[0].get_ylim()[1] * 0.9, "conversation traffic", fontsize=8)
    ax[0].set_title(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


# ---- main --------------------------------------------------------------------------------------------------


async def demo(args: argparse.Namespace, work: Path, out: TextIO) -> dict[str, Any]:
    from prometheus_client import CollectorRegistry

    from controller.actuators import build_actuator
    from controller.config import config_from_dict
    from controller.profiles import resolve_profile_path
    from controller.runtime.sidecar import Sidecar
    from harness.agentfleet import AgentFleet, terminate

    s = args.time_scale
    half = args.duration_s / 2
    schedule = build_schedule(args.duration_s, s)
    profile = scaled_profile(resolve_profile_path(PROFILE), s, work / "profile.yaml")
    print(f"pd-controller demo: {len(schedule)} requests over {args.duration_s:.0f}s (code then conversation), "
          f"emulated GPUs at time scale {s:g}; workdir {work}", file=out, flush=True)
    n_p, n_d = initial_split(args.initial)
    # power-of-two choices: the least loaded of two random workers, close to the least-load routing the
    # controller's pooled prefill model and the simulator assume (round robin queues each worker apart)
    fleet = AgentFleet(work, ["prefill"] * n_p + ["decode"] * n_d, profile=PROFILE, time_scale=s,
                       router=args.router, policy="power_of_two")
    print(f"starting 4 node agents + emulated workers ({n_p}P{n_d}D), the router ({fleet.router_kind.label}), "
          f"the tap...", file=out, flush=True)
    tap: subprocess.Popen[bytes] | None = None
    sidecar_task: asyncio.Task[Any] | None = None
    act: RecordingActuator | None = None
    sidecar = None
    try:
        await fleet.start()
        tap, tap_url, tap_pub = await asyncio.to_thread(start_tap, fleet.router_url, work)
        cfg = config_from_dict(controller_config(profile, fleet, tap_pub, s, work / "flips.json"), origin="demo")
        t0 = time.monotonic()
        act = RecordingActuator(build_actuator(cfg.actuation, CollectorRegistry()), t0)
        sidecar = Sidecar(cfg, registry=CollectorRegistry(), actuator=act, advisory=bool(args.advisory),
                          listen=("127.0.0.1", 0))
        sidecar_task = asyncio.create_task(sidecar.run(signals=False), name="controller")
        print(f"router {fleet.router_url}  tap {tap_url}  controller API: see {work / 'controller.log'}",
              file=out, flush=True)
        client = Client(tap_url, TTFT_S * s, TPOT_MS * s / 1000, seed=args.seed, model=fleet.model)
        samples: list[Sample] = []
        stop_view = asyncio.Event()
        view = asyncio.create_task(live_view(sidecar, act, client, t0, half, samples, stop_view, out), name="view")
        try:
            await client.replay(schedule, t0, asyncio.Event())
        finally:
            stop_view.set()
            await asyncio.gather(view, return_exceptions=True)
        end = await act.fleet()
        fleet_end = (end.count("prefill"), end.count("decode"))
        # the router's own view (GET /workers), independent of the controller's bookkeeping
        router_workers = {w.url: w.role for w in await act.inner.router.workers() if w.healthy}
        plot_path: Path | None = args.plot
        try:
            plot(samples, act, half, args.plot, f"pd-controller demo: {fleet_end[0]}P{fleet_end[1]}D at the end")
        except ImportError:
            plot_path = None
            print("matplotlib is not installed: no plot (pip install 'pd-controller[plot]')", file=out)
        summ = summarize(client, act, samples, fleet_end, half, args, plot_path)
        summ["router_workers"] = router_workers
        return summ
    finally:
        if sidecar is not None:
            sidecar.supervisor.request_stop()
        if sidecar_task is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(sidecar_task, 15)
        if act is not None and sidecar_task is None:
            await act.close()
        if tap is not None:
            await asyncio.to_thread(terminate, tap)
        await asyncio.to_thread(fleet.stop)


async def _baseline(args: argparse.Namespace, work: Path, out: TextIO) -> dict[str, Any]:
    sub = work / "baseline"
    sub.mkdir(exist_ok=True)
    return await demo(args, sub, out)


def print_summary(summ: dict[str, Any], out: TextIO) -> None:
    print("\n== summary ==", file=out)
    att = summ["slo_attainment"]
    print(f"requests {summ['requests']}  failed {summ['failed_requests']}  SLO attainment "
          f"{att * 100:.1f}%" if att is not None else "no requests", file=out)
    for name, ph in summ["phases"].items():
        a2 = ph["slo_attainment_second_half"]
        print(f"  {name:<4}: {ph['requests']} requests, attainment {100 * (ph['slo_attainment'] or 0):.1f}% "
              f"(second half of the phase {100 * (a2 or 0):.1f}%), split at the end "
              f"{summ['split_at_end_of_phase'].get(name, '-')}", file=out)
    print(f"flips {summ['flips']} ok, {summ['flip_failures']} failed; final fleet "
          f"{summ['final_prefill']}P{summ['final_decode']}D", file=out)
    for f in summ["flip_log"]:
        took = "".join(f", {k.removesuffix('_s')} {f[k]}s" for k in ("drain_s", "switch_s", "total_s") if k in f)
        print(f"  t={f['t_s']:>5}s {f['worker']} -> {f['to']}: {'ok' if f['ok'] else 'FAILED'} ({f['reason']}{took})",
              file=out)
    r = summ.get("reaction_s") or {}

    def _s(x: float | None) -> str:
        return "no flip" if x is None else f"{x}s"

    print(f"reaction: first flip done in the code phase: {_s(r.get('code'))}; in the conversation phase: "
          f"{_s(r.get('conv'))} after it began", file=out)
    if summ["plot"]:
        print(f"plot: {summ['plot']}", file=out)
    base = summ.get("baseline")
    if base:
        print("\n== controller vs static (advisory) ==", file=out)
        print(f"{'':<22}{'controller':>12}{'static':>12}", file=out)
        for name in summ["phases"]:
            a, b = summ["phases"][name]["slo_attainment"], base["phases"][name]["slo_attainment"]
            print(f"{name + ' attainment':<22}{100 * (a or 0):>11.1f}%{100 * (b or 0):>11.1f}%", file=out)
        print(f"{'all attainment':<22}{100 * (summ['slo_attainment'] or 0):>11.1f}%"
              f"{100 * (base['slo_attainment'] or 0):>11.1f}%", file=out)
        print(f"{'failed requests':<22}{summ['failed_requests']:>12}{base['failed_requests']:>12}", file=out)


def run(args: argparse.Namespace) -> int:
    if not args.duration_s > 0:
        raise DemoError(f"--duration-s={args.duration_s!r}: must be positive")
    if not 0.05 <= args.time_scale <= 20:
        raise DemoError(f"--time-scale={args.time_scale!r}: must be within 0.05..20")
    from controller.logging import configure_logging

    out = sys.stderr if args.json else sys.stdout
    with contextlib.ExitStack() as stack:
        if args.workdir is not None:
            work = args.workdir
            work.mkdir(parents=True, exist_ok=True)
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pd-demo-")))
        logf = stack.enter_context(open(work / "controller.log", "w"))
        configure_logging(json=True, level="info", stream=logf)

        async def main() -> dict[str, Any]:
            task = asyncio.current_task()
            assert task is not None
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGTERM, task.cancel)
            return await demo(args, work, out)

        try:
            summ = asyncio.run(main())
            if args.compare and not args.advisory:
                print("\n== baseline: the same schedule, the controller advisory (the fleet stays static) ==",
                      file=out, flush=True)
                base_args = argparse.Namespace(**{**vars(args), "advisory": True,
                                                  "plot": args.plot.with_name(args.plot.stem + "-baseline.png")})
                summ["baseline"] = asyncio.run(_baseline(base_args, work, out))
        except (KeyboardInterrupt, asyncio.CancelledError):
            print("\ninterrupted: every process the demo started has been stopped", file=sys.stderr)
            return 130
        if args.json:
            print(json.dumps(summ, indent=1))
        else:
            print_summary(summ, out)
    return 0
