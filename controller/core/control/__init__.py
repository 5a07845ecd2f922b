"""The online control core: estimators, forecaster, calibration, policy stages and the tick.

Pure (no I/O, no clock): `tick(state, obs, spec, now)` is all the live sidecar
and the simulator call.
"""

from controller.core.control.params import ControlParams, ControlSpec, Mode
from controller.core.control.tick import ControllerState, TickResult, initial_state, tick
from controller.core.control.types import (
    Action,
    ActionKind,
    CalibrationView,
    Decision,
    Diagnostics,
    Estimates,
    FleetView,
    Forecast,
    ModelTarget,
    Observations,
    Reason,
    Role,
    Transition,
    WorkerStats,
)

__all__ = [
    "Action",
    "ActionKind",
    "CalibrationView",
    "ControlParams",
    "ControlSpec",
    "ControllerState",
    "Decision",
    "Diagnostics",
    "Estimates",
    "FleetView",
    "Forecast",
    "Mode",
    "ModelTarget",
    "Observations",
    "Reason",
    "Role",
    "TickResult",
    "Transition",
    "WorkerStats",
    "initial_state",
    "tick",
]
