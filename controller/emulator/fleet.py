"""Moved to `harness.fleet` (harness code lives outside the product packages).

This re-export keeps `from controller.emulator.fleet import ...` working for code not yet moved over;
import from `harness.fleet`.
"""

from harness.fleet import HOST, EmulatedFleet, FleetError, WorkerProc, free_port, terminate

__all__ = ["HOST", "EmulatedFleet", "FleetError", "WorkerProc", "free_port", "terminate"]
