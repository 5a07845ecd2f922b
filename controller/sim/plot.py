"""--plot: load, pool sizes and rolling SLO attainment over time, one panel each, per policy."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from controller.sim.runner import Result


def rolling_attainment(r: Result, bin_s: float = 60.0) -> tuple[np.ndarray, np.ndarray]:
    assert r.met is not None and r.arrival_s is not None
    if r.arrival_s.size == 0:
        return np.zeros(0), np.zeros(0)
    b = (r.arrival_s // bin_s).astype(np.int64)
    tot = np.bincount(b)
    ok = np.bincount(b, weights=r.met.astype(np.float64), minlength=tot.size)
    t = (np.arange(tot.size) + 1) * bin_s
    with np.errstate(invalid="ignore", divide="ignore"):
        return t, np.where(tot > 0, ok / np.maximum(tot, 1), np.nan)


def plot(results: list[Result], out: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(4, 1, figsize=(11, 10), sharex=True)
    first = results[0].timeline
    ax[0].plot(np.asarray(first.t) / 60, first.load_rps, color="black", lw=1)
    ax[0].set_ylabel("load (req/s, 1-min)")
    for r in results:
        tl = r.timeline
        t = np.asarray(tl.t) / 60
        ax[1].step(t, tl.prefill, where="post", label=r.policy, lw=1.2)
        ax[2].step(t, tl.decode, where="post", label=r.policy, lw=1.2)
        ta, att = rolling_attainment(r)
        ax[3].plot(ta / 60, att * 100, label=r.policy, lw=1.2)
    ax[1].set_ylabel("prefill instances")
    ax[2].set_ylabel("decode instances")
    ax[3].set_ylabel("SLO attainment % (1-min)")
    ax[3].set_xlabel("time (min)")
    ax[3].axhline(99, color="grey", ls=":", lw=1)
    ax[1].legend(loc="upper right", fontsize=8, ncol=3)
    if title:
        ax[0].set_title(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_scenario(sc: object, jobs: list[dict[str, object]], out: Path) -> None:
    """One figure per matrix scenario: the attainment-vs-GPU-hours (or goodput) points of every
    policy and knob, the static candidates the search simulated, and the fleet over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fixed = getattr(sc, "mode", None) is not None and str(sc.mode.value) == "fixed"  # type: ignore[attr-defined]
    ok = [j for j in jobs if not j.get("error") and "result" in j]
    fig, ax = plt.subplots(1, 2, figsize=(14, 5.2))
    xkey = "goodput_rps" if fixed else "gpu_hours"
    fams: dict[str, list[tuple[float, float, object]]] = {}
    for j in ok:
        r = j["result"]  # type: ignore[index]
        fams.setdefault(str(j["kind"]), []).append((float(r[xkey]), float(r["slo_attainment"]) * 100, j.get("knob")))  # type: ignore[index]
    for j in ok:
        if j["kind"] == "static-best":
            cands = [c for c in j.get("candidates", []) if not c["aborted"]]  # type: ignore[union-attr]
            if cands:
                ax[0].scatter([c[xkey] for c in cands], [c["attainment"] * 100 for c in cands], s=12, color="0.75",
                              label="static candidates", zorder=1)
    style = {"threshold": ("tab:orange", "o-"), "throughput": ("tab:green", "s-"), "static": ("tab:brown", "v"),
             "static-peak": ("tab:pink", "^"), "static-best": ("black", "P"), "oracle": ("tab:purple", "D"),
             "slo": ("tab:blue", "*")}
    for fam, pts in fams.items():
        pts.sort(key=lambda p: (p[2] is None, p[2]))
        color, mk = style.get(fam, ("grey", "x"))
        ax[0].plot([p[0] for p in pts], [p[1] for p in pts], mk, color=color, label=fam,
                   ms=14 if fam == "slo" else 7, zorder=3 if fam == "slo" else 2)
        for x, y, k in pts:
            if k is not None:
                ax[0].annotate(f"{k:g}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")  # type: ignore[arg-type]
    ax[0].axhline(99, color="grey", ls=":", lw=1)
    ax[0].set_xlabel("goodput (req/s)" if fixed else "GPU-hours")
    ax[0].set_ylabel("SLO attainment %")
    lo = min([p[1] for pts in fams.values() for p in pts] + [90.0])
    ax[0].set_ylim(max(lo - 2, 0), 100.5)
    ax[0].legend(fontsize=8, loc="lower right")
    ax[0].set_title(f"{getattr(sc, 'name', '')}: attainment vs {'goodput' if fixed else 'GPU-hours'}")
    # right: GPUs allocated over time and slo's per-minute attainment
    a2 = ax[1].twinx()
    for j in ok:
        r = j["result"]  # type: ignore[index]
        tl = r.get("timeline") if isinstance(r, dict) else None
        if j["kind"] in ("slo", "static-best") and tl and tl["t"]:
            ax[1].step(np.asarray(tl["t"]) / 60, tl["gpus"], where="post", label=f"{j['kind']} GPUs", lw=1.3)
            if j["kind"] == "slo":
                a2.plot(np.asarray(tl["t"]) / 60, tl["load_rps"], color="0.6", lw=0.8, label="load (req/s)")
                ma = [np.nan if v is None else v * 100 for v in r.get("minute_attainment", [])]
                ax[1].plot(np.arange(1, len(ma) + 1), ma, color="tab:red", lw=0.8, alpha=0.6, label="slo attainment %/min")
        if j["kind"] == "oracle":
            ws = j["oracle"]["windows"]  # type: ignore[index]
            xs = [w["start_s"] / 60 for w in ws] + [ws[-1]["end_s"] / 60] if ws else []
            ys = [w["gpus"] for w in ws] + ([ws[-1]["gpus"]] if ws else [])
            ax[1].step(xs, ys, where="post", label="oracle GPUs", lw=1.0, ls="--", color="tab:purple")
    ax[1].set_xlabel("time (min)")
    ax[1].set_ylabel("GPUs allocated / attainment %")
    a2.set_ylabel("load (req/s, 1-min)")
    h1, l1 = ax[1].get_legend_handles_labels()
    h2, l2 = a2.get_legend_handles_labels()
    ax[1].legend(h1 + h2, l1 + l2, fontsize=8, loc="lower left")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=72)
    plt.close(fig)
