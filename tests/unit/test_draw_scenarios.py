"""bench/draw_scenarios.py: seeded, valid, feasible draws for held-out checks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from controller.sim.scenarios import load_scenario

REPO = Path(__file__).resolve().parents[2]


def _draw(seed: int, out: Path) -> list[Path]:
    subprocess.run([sys.executable, str(REPO / "bench" / "draw_scenarios.py"), "--seed", str(seed), "--count", "6",
                    "--out", str(out)], check=True, capture_output=True, cwd=REPO)
    return sorted(out.glob("*.yaml"))


def test_draws_are_valid_feasible_and_repeatable(tmp_path: Path) -> None:
    a = _draw(5, tmp_path / "a")
    b = _draw(5, tmp_path / "b")
    assert len(a) == 6 and [p.read_text() for p in a] == [p.read_text() for p in b]
    for p in a:
        sc = load_scenario(str(p))  # loads as written, relative trace paths resolved from the repository
        assert 30 <= sc.objectives.tpot_ms <= 60 and "held-out" in sc.tags
        if sc.gpus is not None:
            assert sc.mode.value == "fixed" and sc.gpus >= 4
    c = _draw(6, tmp_path / "c")
    assert [p.read_text() for p in c] != [p.read_text() for p in a]
