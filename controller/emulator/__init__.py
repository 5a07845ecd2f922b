"""Emulated SGLang workers: what the real sglang-router registers and routes to, timed from a profile.

- `server.EmulatedWorker`: one worker (aiohttp), prefill or decode role, `/pd_role_switch`.
- `engine`: prefill FIFO and decode continuous batching on the asyncio clock.
- `fleet.EmulatedFleet`: N prefill + M decode workers and the real router as subprocesses.
See docs/emulator.md.
"""
