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
