"""Harness code used only by the demo, the tests and the benches: process launching and emulated fleets.

Outside the product packages (issue 10): the controller runs beside a real router and real
workers and imports nothing from here; `pd-controller demo` imports it when it runs.

- `harness.routers`: which PD router to launch (smg by default, sglang-router, a command template;
  $PD_ROUTER) and its command line: the one place that knows.
- `harness.fleet.EmulatedFleet`: N prefill + M decode emulated workers behind a real router.
- `harness.agentfleet.AgentFleet`: the same with every worker under a node agent (flips by restart).
"""
