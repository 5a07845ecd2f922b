"""The sidecar's HTTP API (aiohttp): metrics, health, state, what-if plans, pause/resume."""
