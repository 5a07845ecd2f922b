"""bench/draw_scenarios.py: seeded, valid, feasible draws for held-out checks."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from controller.sim.scenarios import load_scenario

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("draw_scenarios", REPO / "bench" / "draw_scenarios.py")
assert _spec is not None and _spec.loader is not None
draw_scenarios = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(draw_scenarios)


@pytest.fixture
def _draw(monkeypatch: pytest.MonkeyPatch):
    def draw(seed: int, out: Path) -> list[Path]:
        monkeypatch.setattr("sys.argv", ["draw_scenarios.py", "--seed", str(seed), "--count", "6", "--out", str(out)])
        assert draw_scenarios.main() == 0
        return sorted(out.glob("*.yaml"))
    return draw


def test_draws_are_valid_feasible_and_repeatable(tmp_path: Path, _draw) -> None:
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
