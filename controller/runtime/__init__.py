"""The asyncio runtime of the live sidecar: clock, supervised tasks, the tick loop, the assembled sidecar."""
