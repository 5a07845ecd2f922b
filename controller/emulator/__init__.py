"""Emulated SGLang workers: what the real PD router (smg, sglang-router) registers and routes to, timed from a profile.

- `server.EmulatedWorker`: one worker (aiohttp), prefill or decode role, `/pd_role_switch`.
- `engine`: prefill FIFO and decode continuous batching on the asyncio clock.
- the fleet harness (N prefill + M decode workers behind a real router) is `harness.fleet.EmulatedFleet`.
See docs/emulator.md.
"""
