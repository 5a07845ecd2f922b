"""End-to-end tests: real processes (routers, workers, tap, agents) on loopback."""
