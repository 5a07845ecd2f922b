"""Trace-driven discrete-event simulator of a P/D fleet, with baselines (virtual time)."""
