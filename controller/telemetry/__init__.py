"""Telemetry sources of the live sidecar: tap events over ZeroMQ, Prometheus scrapes, the router's worker list.

Everything here is I/O shell around `controller.core`: it decodes, validates,
counts and buffers (bounded), and hands the tick plain arrays and dataclasses.
"""
