"""Moved to `harness.agentfleet` (harness code lives outside the product packages).

This re-export keeps `from controller.agent.localfleet import ...` working for code not yet moved over;
import from `harness.agentfleet`.
"""

from harness.agentfleet import AgentFleet, LocalFleetError, terminate

__all__ = ["AgentFleet", "LocalFleetError", "terminate"]
