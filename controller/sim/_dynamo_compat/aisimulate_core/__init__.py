"""Stand-in for `aisimulate_core` (see ../README.md): names Dynamo's planner imports, on aiconfigurator-core."""

STANDIN = True
